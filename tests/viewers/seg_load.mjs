// Loads a DICOM SEG the way OHIF's cornerstone-dicom-seg extension does, and prints what it
// labelled as JSON: per segment number, its labelled pixel count in all and per source frame.
//
//   node seg_load.mjs [--reader cornerstone3D|dcmjs] SEG.dcm SOURCE.dcm [SOURCE.dcm ...]
//
// cornerstone3D (the default): OHIF/Viewers extensions/cornerstone-dicom-seg/src/
// getSopClassHandlerModule.ts (_loadSegments) calls
//   adaptersSEG.Cornerstone3D.Segmentation.createFromDICOMSegBuffer(imageIds, arrayBuffer,
//     { metadataProvider: metaData, tolerance: 0.001 })
// with the referenced display set's image IDs and cornerstone's `metaData`, where OHIF's
// MetadataProvider answers for the source images (see ohif_metadata.mjs). OHIF's newest
// release asks createFromDicomSegImageId with the SEG's image ID instead; both run the
// adapter's createLabelmapsFromSegImageIds on the same parsed SEG.
//
// dcmjs: the SEG read with dcmjs alone (DicomMessage.readFile, naturalized), its frames
// unpacked and counted by Segment Identification (BINARY) or pixel value (LABELMAP) and by
// Derivation Image reference: a second reader that shares none of the adapter's geometry code.
//
// Exit status 0 with JSON on stdout; 1 with the error on stderr when the SEG does not load.

import { metaData, utilities as csUtilities } from '@cornerstonejs/core';
import { adaptersSEG } from '@cornerstonejs/adapters';
import { OhifMetadata, readNaturalized } from './ohif_metadata.mjs';

const TOLERANCE = 0.001; // what OHIF passes

async function loadWithCornerstone(segPath, sourcePaths) {
  const ohif = new OhifMetadata();
  const imageIds = sourcePaths.flatMap((path) => ohif.addFile(path));
  // As OHIF's init: the calibrated spacing provider, then OHIF's own at priority 9999.
  metaData.addProvider(
    csUtilities.calibratedPixelSpacingMetadataProvider.get.bind(
      csUtilities.calibratedPixelSpacingMetadataProvider,
    ),
  );
  metaData.addProvider(ohif.provider, 9999);
  const { buffer } = readNaturalized(segPath);
  const results = await adaptersSEG.Cornerstone3D.Segmentation.createFromDICOMSegBuffer(
    imageIds,
    buffer,
    { metadataProvider: metaData, tolerance: TOLERANCE },
  );
  const where = (imageId) => {
    const { SOPInstanceUID, frameNumber } = ohif.uids(imageId);
    return `${SOPInstanceUID}/${frameNumber}`;
  };
  const segments = {};
  for (const segment of results.segMetadata.data) {
    if (segment && segment.SegmentNumber !== undefined) {
      segments[segment.SegmentNumber] = emptyCount(segment.SegmentLabel);
    }
  }
  // One group of labelmap images when no two segments overlap, more when they do; each group
  // holds one labelmap image per source image ID, in order.
  results.labelMapImages.forEach((group) => {
    group.forEach((image, index) => {
      const values = pixelsOf(image);
      countValues(values, (value, count) => {
        const segment = (segments[value] ??= emptyCount(undefined));
        add(segment, where(image.referencedImageId ?? imageIds[index]), count);
      });
    });
  });
  return {
    reader: 'cornerstone3D',
    groups: results.labelMapImages.length,
    overlapping: Boolean(results.overlappingSegments),
    segments,
  };
}

function pixelsOf(image) {
  const manager = image.voxelManager;
  if (manager && typeof manager.getCompleteScalarDataArray === 'function') {
    return manager.getCompleteScalarDataArray();
  }
  return image.getPixelData();
}

function loadWithDcmjs(segPath) {
  const { dataset: seg } = readNaturalized(segPath);
  const rows = Number(seg.Rows);
  const columns = Number(seg.Columns);
  const frames = Number(seg.NumberOfFrames) || 1;
  const pixels = unpackedFrames(seg, rows * columns, frames);
  const labelmap = seg.SegmentationType === 'LABELMAP';
  const shared = seg.SharedFunctionalGroupsSequence?.[0] ?? {};
  const segments = {};
  for (const segment of seg.SegmentSequence ?? []) {
    segments[segment.SegmentNumber] = emptyCount(segment.SegmentLabel);
  }
  for (let frame = 0; frame < frames; frame++) {
    const groups = seg.PerFrameFunctionalGroupsSequence[frame];
    const source = (groups.DerivationImageSequence ?? shared.DerivationImageSequence)[0]
      .SourceImageSequence[0];
    const where = `${source.ReferencedSOPInstanceUID}/${source.ReferencedFrameNumber ?? 1}`;
    const values = pixels.subarray(frame * rows * columns, (frame + 1) * rows * columns);
    const identification = (
      groups.SegmentIdentificationSequence ?? shared.SegmentIdentificationSequence
    )?.[0];
    countValues(values, (value, count) => {
      const number = labelmap ? value : Number(identification.ReferencedSegmentNumber);
      add((segments[number] ??= emptyCount(undefined)), where, count);
    });
  }
  return { reader: 'dcmjs', segments };
}

function unpackedFrames(seg, frameLength, frames) {
  const raw = seg.PixelData[0];
  const bits = Number(seg.BitsAllocated);
  if (bits === 16) {
    return new Uint16Array(raw);
  }
  const bytes = new Uint8Array(raw);
  if (bits === 8) {
    return bytes;
  }
  // BitsAllocated 1: frames follow one another bit by bit, least significant bit first.
  const unpacked = new Uint8Array(frameLength * frames);
  for (let index = 0; index < unpacked.length; index++) {
    unpacked[index] = (bytes[index >> 3] >> (index & 7)) & 1;
  }
  return unpacked;
}

function countValues(values, report) {
  const counts = new Map();
  for (let index = 0; index < values.length; index++) {
    const value = values[index];
    if (value !== 0) {
      counts.set(value, (counts.get(value) ?? 0) + 1);
    }
  }
  counts.forEach((count, value) => report(value, count));
}

function emptyCount(label) {
  return { label: label ?? null, pixels: 0, frames: {} };
}

function add(segment, where, count) {
  segment.pixels += count;
  segment.frames[where] = (segment.frames[where] ?? 0) + count;
}

async function main(argv) {
  let reader = 'cornerstone3D';
  const paths = [];
  for (let index = 0; index < argv.length; index++) {
    if (argv[index] === '--reader') {
      reader = argv[++index];
    } else {
      paths.push(argv[index]);
    }
  }
  const [segPath, ...sourcePaths] = paths;
  if (!segPath || (reader === 'cornerstone3D' && sourcePaths.length === 0)) {
    throw new Error('usage: seg_load.mjs [--reader cornerstone3D|dcmjs] SEG SOURCE...');
  }
  if (reader === 'dcmjs') {
    return loadWithDcmjs(segPath);
  }
  if (reader === 'cornerstone3D') {
    return loadWithCornerstone(segPath, sourcePaths);
  }
  throw new Error(`unknown reader ${reader}`);
}

main(process.argv.slice(2)).then(
  (result) => {
    process.stdout.write(`${JSON.stringify(result)}\n`);
  },
  (error) => {
    process.stderr.write(`seg_load: ${error && error.stack ? error.stack : error}\n`);
    process.exit(1);
  },
);
