// The source images' metadata served to cornerstone3D the way OHIF serves it.
//
// OHIF keeps every instance naturalized by dcmjs in its DicomMetadataStore and registers
// `MetadataProvider.get` with cornerstone's `metaData.addProvider(..., 9999)`
// (OHIF/Viewers extensions/cornerstone/src/init.tsx). That provider answers `instance` with the
// naturalized instance (combined with one frame's functional groups for a multi-frame image:
// platform/core/src/utils/combineFrameInstance.ts), a naturalized keyword straight from the
// instance, and the cornerstone modules from its own handlers; imagePlaneModule defaults the
// orientation to 1\0\0\0\1\0 and the position to 0\0\0 where the image has none (a DX film).
// Ported from OHIF/Viewers platform/core/src/classes/MetadataProvider.ts at commit
// 01ca45846bc02a2f1cc13314529424ddd44b3b14: only the modules the SEG and SR loaders ask for.
// Here the instances come from files parsed with dcmjs rather than from DICOMweb JSON; both
// naturalize to the same objects.

import fs from 'node:fs';
import dcmjs from 'dcmjs';
import { utilities } from '@cornerstonejs/core';

const { DicomMessage, DicomMetaDictionary } = dcmjs.data;

// Image IDs as OHIF's DICOMweb data source makes them (one per frame, WADO-RS frames URL).
const WADO_ROOT = 'wadors:https://pacs.invalid/dicom-web';

export function readNaturalized(path) {
  const bytes = fs.readFileSync(path);
  const buffer = bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength);
  const dicom = DicomMessage.readFile(buffer);
  const dataset = DicomMetaDictionary.naturalizeDataset(dicom.dict);
  dataset._meta = DicomMetaDictionary.namifyDataset(dicom.meta);
  return { dataset, buffer };
}

export class OhifMetadata {
  constructor() {
    this.instances = new Map(); // SOP Instance UID -> naturalized instance (DicomMetadataStore)
    this.customMetadata = new Map();
  }

  /** Adds a source file; returns its image IDs, one per frame, in frame order. */
  addFile(path) {
    const { dataset } = readNaturalized(path);
    this.instances.set(dataset.SOPInstanceUID, dataset);
    const frames = Number(dataset.NumberOfFrames) || 1;
    const base =
      `${WADO_ROOT}/studies/${dataset.StudyInstanceUID}/series/${dataset.SeriesInstanceUID}` +
      `/instances/${dataset.SOPInstanceUID}/frames/`;
    return Array.from({ length: frames }, (_, index) => `${base}${index + 1}`);
  }

  /** The provider function for cornerstone's metaData.addProvider. */
  get provider() {
    return (query, imageId) => this.get(query, imageId);
  }

  addCustomMetadata(imageId, type, metadata) {
    if (!this.customMetadata.has(type)) {
      this.customMetadata.set(type, {});
    }
    this.customMetadata.get(type)[imageId] = metadata;
  }

  uids(imageId) {
    if (typeof imageId !== 'string' || !imageId.startsWith('wadors:')) {
      return undefined;
    }
    const parts = imageId.split('/studies/')[1].split('/');
    return {
      StudyInstanceUID: parts[0],
      SeriesInstanceUID: parts[2],
      SOPInstanceUID: parts[4],
      frameNumber: parts[6],
    };
  }

  instance(imageId) {
    const uids = this.uids(imageId);
    const instance = uids && this.instances.get(uids.SOPInstanceUID);
    if (!instance) {
      return undefined;
    }
    return (uids.frameNumber && combineFrameInstance(uids.frameNumber, instance)) || instance;
  }

  get(query, imageId) {
    if (Array.isArray(imageId)) {
      return undefined;
    }
    const instance = this.instance(imageId);
    if (query === 'instance') {
      return instance;
    }
    const custom = this.customMetadata.get(query);
    if (custom && custom[imageId]) {
      return custom[imageId];
    }
    if (!instance) {
      return undefined;
    }
    if (instance[query]) {
      return instance[query];
    }
    return moduleOf(query, instance);
  }
}

// OHIF's combineFrameInstance: the shared, then the frame's own, functional group items merged
// onto the instance (OHIF assigns onto the stored instance itself; so does this).
function combineFrameInstance(frame, instance) {
  const { PerFrameFunctionalGroupsSequence, SharedFunctionalGroupsSequence, NumberOfFrames } =
    instance;
  if (!(PerFrameFunctionalGroupsSequence || NumberOfFrames > 1)) {
    return instance;
  }
  const frameNumber = Number.parseInt(frame || 1, 10);
  const itemsOf = (group) =>
    (group ? Object.values(group) : [])
      .filter((it) => !!it)
      .map((it) => it[0])
      .filter((it) => it !== undefined && typeof it === 'object');
  const shared = itemsOf(SharedFunctionalGroupsSequence?.[0]);
  const perFrame = itemsOf(PerFrameFunctionalGroupsSequence?.[frameNumber - 1]);
  const combined = Object.assign(instance, { frameNumber });
  [...shared, ...perFrame].forEach((item) => {
    Object.entries(item).forEach(([key, value]) => {
      combined[key] = value;
    });
  });
  return combined;
}

function toNumber(value) {
  if (value === undefined || value === null) {
    return undefined;
  }
  if (Array.isArray(value)) {
    return value.map(Number);
  }
  return Number(value);
}

function moduleOf(query, instance) {
  switch (query) {
    case 'generalSeriesModule':
      return {
        modality: instance.Modality,
        seriesInstanceUID: instance.SeriesInstanceUID,
        seriesNumber: toNumber(instance.SeriesNumber),
        studyInstanceUID: instance.StudyInstanceUID,
      };
    case 'generalImageModule':
      return {
        sopInstanceUID: instance.SOPInstanceUID,
        instanceNumber: toNumber(instance.InstanceNumber),
        lossyImageCompression: instance.LossyImageCompression,
      };
    case 'sopCommonModule':
      return { sopClassUID: instance.SOPClassUID, sopInstanceUID: instance.SOPInstanceUID };
    case 'imagePixelModule':
      return {
        samplesPerPixel: toNumber(instance.SamplesPerPixel),
        photometricInterpretation: instance.PhotometricInterpretation,
        rows: toNumber(instance.Rows),
        columns: toNumber(instance.Columns),
        bitsAllocated: toNumber(instance.BitsAllocated),
        bitsStored: toNumber(instance.BitsStored),
        highBit: toNumber(instance.HighBit),
        pixelRepresentation: toNumber(instance.PixelRepresentation),
      };
    case 'frameModule':
      return {
        frameNumber: instance.frameNumber ?? 1,
        numberOfFrames: instance.numberOfFrames ?? 1,
        sopClassUID: instance.SOPClassUID,
        sopInstanceUID: instance.SOPInstanceUID,
      };
    case 'imagePlaneModule':
      return imagePlaneModule(instance);
    default:
      return undefined;
  }
}

function imagePlaneModule(instance) {
  const { ImageOrientationPatient, ImagePositionPatient } = instance;
  // OHIF's "fallback for DX images": spacing from Imager Pixel Spacing and friends.
  const { PixelSpacing } = utilities.getPixelSpacingInformation(instance) || {};
  const [rowPixelSpacing, columnPixelSpacing] = PixelSpacing ? PixelSpacing.map(Number) : [1, 1];
  const orientation = ImageOrientationPatient
    ? toNumber(ImageOrientationPatient)
    : [1, 0, 0, 0, 1, 0];
  return {
    frameOfReferenceUID: instance.FrameOfReferenceUID,
    rows: toNumber(instance.Rows),
    columns: toNumber(instance.Columns),
    spacingBetweenSlices: toNumber(instance.SpacingBetweenSlices),
    imageOrientationPatient: orientation,
    rowCosines: orientation.slice(0, 3),
    columnCosines: orientation.slice(3, 6),
    imagePositionPatient: toNumber(ImagePositionPatient) || [0, 0, 0],
    sliceThickness: toNumber(instance.SliceThickness),
    pixelSpacing: toNumber(PixelSpacing || 1),
    rowPixelSpacing,
    columnPixelSpacing,
    usingDefaultValues: !ImageOrientationPatient || !ImagePositionPatient || !PixelSpacing,
  };
}
