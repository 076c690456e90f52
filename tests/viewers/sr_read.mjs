// Reads a TID 1500 Measurement Report the way OHIF's DICOM SR extension does, and prints JSON.
//
//   node sr_read.mjs SR.dcm [SOURCE.dcm ...]
//
// The walk is ported from OHIF/Viewers extensions/cornerstone-dicom-sr/src/
// getSopClassHandlerModule.ts at commit cccb0bfeea83387fe8588850ee19b14bed88960a, function by
// function and with its quirks (the newest OHIF was not to be had here; this is the newest
// revision of the file at hand): _getDisplaySetsFromSeries (only TID 1500 is shown),
// _getReferencedImagesList (the Image Library), _getMeasurements (measurement groups merged by
// Tracking Unique Identifier, TID 1410 groups by their SCOORD, the others by their NUMs) and
// _checkIfCanAddMeasurementsToDisplaySet (each measurement placed on the image and frame its
// SCOORD references, among the display sets: here one per SOURCE file, image IDs as OHIF's
// DICOMweb data source makes them, see ohif_metadata.mjs). The SR is parsed as OHIF parses
// instances: dcmjs, naturalized (a one-item sequence reads as its item).
//
// Printed: "ohif", what that code makes of the report (or the error it throws); "report", a
// plain walk of the same document (Image Library entries, every measurement group with its
// tracking identifier and UID, SCOORDs with their image and frame, NUMs with concept, value and
// unit, qualitative evaluations), which OHIF does not keep but a test wants to see; "problems".
//
// Exit status 1, with the problems also on stderr, when OHIF would throw, would refuse the
// document, or would skip a measurement that has a SCOORD (no given image holds its frame), and
// when a SCOORD's image or frame is missing from the Image Library or the evidence. A
// measurement without a SCOORD (a TID 1501 image-level finding) has nothing for OHIF to place:
// it is listed, not a problem.

import { OhifMetadata, readNaturalized } from './ohif_metadata.mjs';

// --- OHIF's code (commit cccb0bfe), as it is --------------------------------------------------

const CodeNameCodeSequenceValues = {
  ImagingMeasurementReport: '126000',
  ImageLibrary: '111028',
  ImagingMeasurements: '126010',
  MeasurementGroup: '125007',
  ImageLibraryGroup: '126200',
  TrackingUniqueIdentifier: '112040',
  TrackingIdentifier: '112039',
  Finding: '121071',
  FindingSite: 'G-C0E3', // SRT
  CornerstoneFreeText: 'CORNERSTONEFREETEXT',
};

const CodingSchemeDesignators = {
  SRT: 'SRT',
  CornerstoneCodeSchemes: ['Cornerstone3DTools', 'CST4'],
};

const RELATIONSHIP_TYPE = {
  INFERRED_FROM: 'INFERRED FROM',
  CONTAINS: 'CONTAINS',
};

const CORNERSTONE_FREETEXT_CODE_VALUE = 'CORNERSTONEFREETEXT';

function _getMeasurements(ImagingMeasurementReportContentSequence) {
  const ImagingMeasurements = ImagingMeasurementReportContentSequence.find(
    (item) =>
      item.ConceptNameCodeSequence.CodeValue === CodeNameCodeSequenceValues.ImagingMeasurements,
  );
  const MeasurementGroups = _getSequenceAsArray(ImagingMeasurements.ContentSequence).filter(
    (item) =>
      item.ConceptNameCodeSequence.CodeValue === CodeNameCodeSequenceValues.MeasurementGroup,
  );
  const mergedContentSequencesByTrackingUniqueIdentifiers =
    _getMergedContentSequencesByTrackingUniqueIdentifiers(MeasurementGroups);
  const measurements = [];
  Object.keys(mergedContentSequencesByTrackingUniqueIdentifiers).forEach(
    (trackingUniqueIdentifier) => {
      const mergedContentSequence =
        mergedContentSequencesByTrackingUniqueIdentifiers[trackingUniqueIdentifier];
      const measurement = _processMeasurement(mergedContentSequence);
      if (measurement) {
        measurements.push(measurement);
      }
    },
  );
  return measurements;
}

function _getMergedContentSequencesByTrackingUniqueIdentifiers(MeasurementGroups) {
  const merged = {};
  MeasurementGroups.forEach((MeasurementGroup) => {
    const ContentSequence = _getSequenceAsArray(MeasurementGroup.ContentSequence);
    const TrackingUniqueIdentifierItem = ContentSequence.find(
      (item) =>
        item.ConceptNameCodeSequence.CodeValue ===
        CodeNameCodeSequenceValues.TrackingUniqueIdentifier,
    );
    if (!TrackingUniqueIdentifierItem) {
      warn('No Tracking Unique Identifier, skipping ambiguous measurement.');
    }
    const trackingUniqueIdentifier = TrackingUniqueIdentifierItem.UID;
    if (merged[trackingUniqueIdentifier] === undefined) {
      merged[trackingUniqueIdentifier] = [...ContentSequence];
    } else {
      ContentSequence.forEach((item) => {
        if (
          item.ConceptNameCodeSequence.CodeValue !==
          CodeNameCodeSequenceValues.TrackingUniqueIdentifier
        ) {
          merged[trackingUniqueIdentifier].push(item);
        }
      });
    }
  });
  return merged;
}

function _processMeasurement(mergedContentSequence) {
  if (
    mergedContentSequence.some(
      (group) => group.ValueType === 'SCOORD' || group.ValueType === 'SCOORD3D',
    )
  ) {
    return _processTID1410Measurement(mergedContentSequence);
  }
  return _processNonGeometricallyDefinedMeasurement(mergedContentSequence);
}

function _processTID1410Measurement(mergedContentSequence) {
  const graphicItem = mergedContentSequence.find((group) => group.ValueType === 'SCOORD');
  const UIDREFContentItem = mergedContentSequence.find((group) => group.ValueType === 'UIDREF');
  const TrackingIdentifierContentItem = mergedContentSequence.find(
    (item) =>
      item.ConceptNameCodeSequence.CodeValue === CodeNameCodeSequenceValues.TrackingIdentifier,
  );
  if (!graphicItem) {
    warn(`graphic ValueType ${graphicItem.ValueType} not currently supported, skipping.`);
    return undefined;
  }
  const NUMContentItems = mergedContentSequence.filter((group) => group.ValueType === 'NUM');
  const measurement = {
    loaded: false,
    labels: [],
    coords: [_getCoordsFromSCOORDOrSCOORD3D(graphicItem)],
    TrackingUniqueIdentifier: UIDREFContentItem.UID,
    TrackingIdentifier: TrackingIdentifierContentItem.TextValue,
  };
  NUMContentItems.forEach((item) => {
    const { ConceptNameCodeSequence, MeasuredValueSequence } = item;
    if (MeasuredValueSequence) {
      measurement.labels.push(
        _getLabelFromMeasuredValueSequence(ConceptNameCodeSequence, MeasuredValueSequence),
      );
    }
  });
  return measurement;
}

function _processNonGeometricallyDefinedMeasurement(mergedContentSequence) {
  const NUMContentItems = mergedContentSequence.filter((group) => group.ValueType === 'NUM');
  const UIDREFContentItem = mergedContentSequence.find((group) => group.ValueType === 'UIDREF');
  const TrackingIdentifierContentItem = mergedContentSequence.find(
    (item) =>
      item.ConceptNameCodeSequence.CodeValue === CodeNameCodeSequenceValues.TrackingIdentifier,
  );
  const finding = mergedContentSequence.find(
    (item) => item.ConceptNameCodeSequence.CodeValue === CodeNameCodeSequenceValues.Finding,
  );
  const findingSites = mergedContentSequence.filter(
    (item) =>
      item.ConceptNameCodeSequence.CodingSchemeDesignator === CodingSchemeDesignators.SRT &&
      item.ConceptNameCodeSequence.CodeValue === CodeNameCodeSequenceValues.FindingSite,
  );
  const measurement = {
    loaded: false,
    labels: [],
    coords: [],
    TrackingUniqueIdentifier: UIDREFContentItem.UID,
    TrackingIdentifier: TrackingIdentifierContentItem.TextValue,
  };
  if (
    finding &&
    CodingSchemeDesignators.CornerstoneCodeSchemes.includes(
      finding.ConceptCodeSequence.CodingSchemeDesignator,
    ) &&
    finding.ConceptCodeSequence.CodeValue === CodeNameCodeSequenceValues.CornerstoneFreeText
  ) {
    measurement.labels.push({
      label: CORNERSTONE_FREETEXT_CODE_VALUE,
      value: finding.ConceptCodeSequence.CodeMeaning,
    });
  }
  if (findingSites.length) {
    const freeTextSite = findingSites.find(
      (site) =>
        CodingSchemeDesignators.CornerstoneCodeSchemes.includes(
          site.ConceptCodeSequence.CodingSchemeDesignator,
        ) && site.ConceptCodeSequence.CodeValue === CodeNameCodeSequenceValues.CornerstoneFreeText,
    );
    if (freeTextSite) {
      measurement.labels.push({
        label: CORNERSTONE_FREETEXT_CODE_VALUE,
        value: freeTextSite.ConceptCodeSequence.CodeMeaning,
      });
    }
  }
  NUMContentItems.forEach((item) => {
    const { ConceptNameCodeSequence, ContentSequence, MeasuredValueSequence } = item;
    // OHIF reads the NUM's children unguarded: a NUM without any throws a TypeError here.
    const { ValueType } = ContentSequence;
    // (sic: OHIF's test is always false)
    if (!ValueType === 'SCOORD') {
      warn(`Graphic ${ValueType} not currently supported, skipping annotation.`);
      return;
    }
    const coords = _getCoordsFromSCOORDOrSCOORD3D(ContentSequence);
    if (coords) {
      measurement.coords.push(coords);
    }
    if (MeasuredValueSequence) {
      measurement.labels.push(
        _getLabelFromMeasuredValueSequence(ConceptNameCodeSequence, MeasuredValueSequence),
      );
    }
  });
  return measurement;
}

function _getCoordsFromSCOORDOrSCOORD3D(item) {
  const { ValueType, RelationshipType, GraphicType, GraphicData } = item;
  if (
    !(
      RelationshipType === RELATIONSHIP_TYPE.INFERRED_FROM ||
      RelationshipType === RELATIONSHIP_TYPE.CONTAINS
    )
  ) {
    warn(`Relationshiptype === ${RelationshipType}: not a TID 1400 SCOORD group, skipped`);
    return undefined;
  }
  const coords = { ValueType, GraphicType, GraphicData };
  if (ValueType === 'SCOORD') {
    const { ReferencedSOPSequence } = item.ContentSequence;
    coords.ReferencedSOPSequence = ReferencedSOPSequence;
  } else if (ValueType === 'SCOORD3D') {
    const { ReferencedFrameOfReferenceSequence } = item.ContentSequence;
    coords.ReferencedFrameOfReferenceSequence = ReferencedFrameOfReferenceSequence;
  }
  return coords;
}

function _getLabelFromMeasuredValueSequence(ConceptNameCodeSequence, MeasuredValueSequence) {
  const { CodeMeaning } = ConceptNameCodeSequence;
  const { NumericValue, MeasurementUnitsCodeSequence } = MeasuredValueSequence;
  const { CodeValue } = MeasurementUnitsCodeSequence;
  const formatedNumericValue = NumericValue ? Number(NumericValue).toFixed(2) : '';
  return { label: CodeMeaning, value: `${formatedNumericValue} ${CodeValue}` };
}

function _getReferencedImagesList(ImagingMeasurementReportContentSequence) {
  const ImageLibrary = ImagingMeasurementReportContentSequence.find(
    (item) => item.ConceptNameCodeSequence.CodeValue === CodeNameCodeSequenceValues.ImageLibrary,
  );
  const ImageLibraryGroup = _getSequenceAsArray(ImageLibrary.ContentSequence).find(
    (item) =>
      item.ConceptNameCodeSequence.CodeValue === CodeNameCodeSequenceValues.ImageLibraryGroup,
  );
  const referencedImages = [];
  _getSequenceAsArray(ImageLibraryGroup.ContentSequence).forEach((item) => {
    const { ReferencedSOPSequence } = item;
    if (!ReferencedSOPSequence) {
      return;
    }
    for (const ref of _getSequenceAsArray(ReferencedSOPSequence)) {
      if (ref.ReferencedSOPClassUID) {
        const { ReferencedSOPClassUID, ReferencedSOPInstanceUID } = ref;
        referencedImages.push({ ReferencedSOPClassUID, ReferencedSOPInstanceUID });
      }
    }
  });
  return referencedImages;
}

// _checkIfCanAddMeasurementsToDisplaySet, less what only draws (addDICOMSRDisplayAnnotation)
// and the mode's onBeforeSRAddMeasurement hook (none by default).
function _checkIfCanAddMeasurementsToDisplaySet(measurements, newDisplaySet, metadata) {
  let unloadedMeasurements = measurements.filter((measurement) => measurement.loaded === false);
  if (unloadedMeasurements.length === 0) {
    return;
  }
  const { sopClassUids } = newDisplaySet;
  unloadedMeasurements = unloadedMeasurements.filter((measurement) =>
    measurement.coords.some((coord) =>
      sopClassUids.includes(coord.ReferencedSOPSequence.ReferencedSOPClassUID),
    ),
  );
  if (unloadedMeasurements.length === 0) {
    return;
  }
  const SOPInstanceUIDs = [];
  unloadedMeasurements.forEach((measurement) => {
    measurement.coords.forEach((coord) => {
      const SOPInstanceUID = coord.ReferencedSOPSequence.ReferencedSOPInstanceUID;
      if (!SOPInstanceUIDs.includes(SOPInstanceUID)) {
        SOPInstanceUIDs.push(SOPInstanceUID);
      }
    });
  });
  for (const imageId of newDisplaySet.imageIds) {
    if (!unloadedMeasurements.length) {
      return;
    }
    const { SOPInstanceUID, frameNumber } = metadata.uids(imageId);
    if (SOPInstanceUIDs.includes(SOPInstanceUID)) {
      for (let j = unloadedMeasurements.length - 1; j >= 0; j--) {
        const measurement = unloadedMeasurements[j];
        if (_measurementReferencesSOPInstanceUID(measurement, SOPInstanceUID, frameNumber)) {
          const frame =
            (measurement.coords[0].ReferencedSOPSequence &&
              measurement.coords[0].ReferencedSOPSequence?.ReferencedFrameNumber) ||
            1;
          measurement.loaded = true;
          measurement.imageId = imageId;
          measurement.ReferencedSOPInstanceUID =
            measurement.coords[0].ReferencedSOPSequence.ReferencedSOPInstanceUID;
          measurement.frameNumber = frame;
          unloadedMeasurements.splice(j, 1);
        }
      }
    }
  }
}

function _measurementReferencesSOPInstanceUID(measurement, SOPInstanceUID, frameNumber) {
  const { coords } = measurement;
  const ReferencedFrameNumber =
    (measurement.coords[0].ReferencedSOPSequence &&
      measurement.coords[0].ReferencedSOPSequence?.ReferencedFrameNumber) ||
    1;
  if (frameNumber && Number(frameNumber) !== Number(ReferencedFrameNumber)) {
    return false;
  }
  for (let j = 0; j < coords.length; j++) {
    const { ReferencedSOPInstanceUID } = coords[j].ReferencedSOPSequence;
    if (ReferencedSOPInstanceUID === SOPInstanceUID) {
      return true;
    }
  }
  return undefined;
}

function _getSequenceAsArray(sequence) {
  if (!sequence) {
    return [];
  }
  return Array.isArray(sequence) ? sequence : [sequence];
}

// --- running it, as OHIF's _load does ---------------------------------------------------------

const warnings = [];

function warn(message) {
  warnings.push(message);
}

function ohifView(instance, sourcePaths) {
  const { ConceptNameCodeSequence, ContentSequence } = instance;
  if (
    !ConceptNameCodeSequence ||
    ConceptNameCodeSequence.CodeValue !== CodeNameCodeSequenceValues.ImagingMeasurementReport
  ) {
    return { refused: 'OHIF only supports TID1500 Imaging Measurement Report SRs' };
  }
  let stage = '_getReferencedImagesList';
  try {
    const referencedImages = _getReferencedImagesList(ContentSequence);
    stage = '_getMeasurements';
    const measurements = _getMeasurements(ContentSequence);
    const described = measurements.map((m) => ({ ...m, coords: m.coords.map(coordOf) }));
    stage = '_checkIfCanAddMeasurementsToDisplaySet';
    const metadata = new OhifMetadata();
    for (const path of sourcePaths) {
      const imageIds = metadata.addFile(path);
      const { SOPClassUID } = metadata.instance(imageIds[0]);
      const displaySet = { sopClassUids: [SOPClassUID], imageIds };
      _checkIfCanAddMeasurementsToDisplaySet(measurements, displaySet, metadata);
    }
    return {
      referencedImages,
      measurements: measurements.map((m, index) => ({
        trackingIdentifier: m.TrackingIdentifier,
        trackingUniqueIdentifier: m.TrackingUniqueIdentifier,
        labels: m.labels,
        coords: described[index].coords,
        placed: m.loaded
          ? { sopInstanceUID: m.ReferencedSOPInstanceUID, frame: Number(m.frameNumber) }
          : null,
      })),
      warnings,
    };
  } catch (error) {
    return { error: `${stage}: ${error}`, warnings };
  }
}

function coordOf(coord) {
  const reference = coord.ReferencedSOPSequence;
  return {
    valueType: coord.ValueType ?? null,
    graphicType: coord.GraphicType ?? null,
    sopInstanceUID: reference?.ReferencedSOPInstanceUID ?? null,
    frame: reference?.ReferencedFrameNumber ?? null,
  };
}

// --- the plain walk of the document -----------------------------------------------------------

const TRACKING_IDENTIFIER = '112039';
const TRACKING_UID = '112040';
const FINDING = '121071';

function reportView(instance) {
  const root = instance.ContentSequence ?? [];
  const library = root.find((item) => codeOf(item) === CodeNameCodeSequenceValues.ImageLibrary);
  const measurements = root.find(
    (item) => codeOf(item) === CodeNameCodeSequenceValues.ImagingMeasurements,
  );
  return {
    imageLibrary: libraryEntries(library),
    groups: childrenOf(measurements)
      .filter((item) => codeOf(item) === CodeNameCodeSequenceValues.MeasurementGroup)
      .map(groupOf),
    evidence: evidenceOf(instance),
  };
}

function libraryEntries(library) {
  const entries = [];
  const visit = (item) => {
    if (item.ValueType === 'IMAGE') {
      entries.push(imageOf(item));
    } else if (item.ValueType === 'CONTAINER') {
      childrenOf(item).forEach(visit);
    }
  };
  childrenOf(library).forEach(visit);
  return entries;
}

function groupOf(group) {
  const items = childrenOf(group);
  const text = (code) => items.find((item) => codeOf(item) === code);
  return {
    trackingIdentifier: text(TRACKING_IDENTIFIER)?.TextValue ?? null,
    trackingUID: text(TRACKING_UID)?.UID ?? null,
    finding: conceptOf(text(FINDING)?.ConceptCodeSequence),
    scoords: items.filter((item) => item.ValueType === 'SCOORD').map(scoordOf),
    nums: items.filter((item) => item.ValueType === 'NUM').map(numOf),
    qualitative: items
      .filter((item) => item.ValueType === 'CODE' && codeOf(item) !== FINDING)
      .map((item) => ({
        concept: conceptOf(item.ConceptNameCodeSequence),
        value: conceptOf(item.ConceptCodeSequence),
      })),
    images: items.filter((item) => item.ValueType === 'IMAGE').map(imageOf),
  };
}

function scoordOf(item) {
  const source = childrenOf(item).find((child) => child.ValueType === 'IMAGE');
  return {
    graphicType: item.GraphicType,
    points: (item.GraphicData?.length ?? 0) / 2,
    image: source ? imageOf(source) : null,
  };
}

function numOf(item) {
  const measured = item.MeasuredValueSequence?.[0];
  return {
    concept: conceptOf(item.ConceptNameCodeSequence),
    value: measured ? Number(measured.NumericValue) : null,
    unit: measured ? measured.MeasurementUnitsCodeSequence[0].CodeValue : null,
  };
}

function imageOf(item) {
  const reference = item.ReferencedSOPSequence[0];
  return {
    concept: conceptOf(item.ConceptNameCodeSequence),
    sopClassUID: reference.ReferencedSOPClassUID,
    sopInstanceUID: reference.ReferencedSOPInstanceUID,
    frames: numbers(reference.ReferencedFrameNumber),
    segments: numbers(reference.ReferencedSegmentNumber),
  };
}

function evidenceOf(instance) {
  const uids = [];
  for (const study of instance.CurrentRequestedProcedureEvidenceSequence ?? []) {
    for (const series of study.ReferencedSeriesSequence ?? []) {
      for (const sop of series.ReferencedSOPSequence ?? []) {
        uids.push(sop.ReferencedSOPInstanceUID);
      }
    }
  }
  return uids;
}

function numbers(value) {
  if (value === undefined || value === null || value === '') {
    return [];
  }
  return (Array.isArray(value) ? value : [value]).map(Number);
}

function childrenOf(item) {
  return item?.ContentSequence ?? [];
}

function codeOf(item) {
  return item.ConceptNameCodeSequence?.[0]?.CodeValue;
}

function conceptOf(sequence) {
  const code = sequence?.[0];
  return code
    ? { value: code.CodeValue, scheme: code.CodingSchemeDesignator, meaning: code.CodeMeaning }
    : null;
}

// --- what OHIF would throw, refuse or skip, and what the library or evidence lacks ------------

function problemsOf(ohif, report, frameCounts) {
  if (ohif.refused) {
    return [`OHIF refuses the document: ${ohif.refused}`];
  }
  if (ohif.error) {
    return [`OHIF throws while loading it, in ${ohif.error}`];
  }
  const problems = [];
  for (const measurement of ohif.measurements) {
    if (measurement.coords.length && !measurement.placed) {
      problems.push(
        `OHIF skips measurement ${JSON.stringify(measurement.trackingIdentifier)}: ` +
          `no given image holds ${JSON.stringify(measurement.coords[0])}`,
      );
    }
  }
  const library = new Map(report.imageLibrary.map((entry) => [entry.sopInstanceUID, entry]));
  for (const group of report.groups) {
    for (const scoord of group.scoords) {
      problems.push(...scoordProblems(group, scoord, library, report.evidence, frameCounts));
    }
  }
  return problems;
}

function scoordProblems(group, scoord, library, evidence, frameCounts) {
  const name = JSON.stringify(group.trackingIdentifier);
  if (!scoord.image) {
    return [`SCOORD of group ${name} names no image`];
  }
  const { sopInstanceUID, frames } = scoord.image;
  const problems = [];
  const entry = library.get(sopInstanceUID);
  if (!entry) {
    problems.push(`SCOORD of group ${name} is on ${sopInstanceUID}, not in the Image Library`);
  } else if (entry.frames.length && frames.some((frame) => !entry.frames.includes(frame))) {
    problems.push(
      `SCOORD of group ${name} is on frame(s) ${frames} of ${sopInstanceUID}; the Image ` +
        `Library lists frame(s) ${entry.frames}`,
    );
  }
  if (!evidence.includes(sopInstanceUID)) {
    problems.push(`SCOORD of group ${name} is on ${sopInstanceUID}, not in the evidence`);
  }
  const count = frameCounts.get(sopInstanceUID);
  if (count !== undefined && frames.some((frame) => frame < 1 || frame > count)) {
    problems.push(`SCOORD of group ${name} is on frame(s) ${frames}; the image has ${count}`);
  }
  return problems;
}

function frameCountsOf(sourcePaths) {
  const counts = new Map();
  for (const path of sourcePaths) {
    const { dataset } = readNaturalized(path);
    counts.set(dataset.SOPInstanceUID, Number(dataset.NumberOfFrames) || 1);
  }
  return counts;
}

function main(argv) {
  const [srPath, ...sourcePaths] = argv;
  if (!srPath) {
    process.stderr.write('usage: sr_read.mjs SR.dcm [SOURCE.dcm ...]\n');
    return 2;
  }
  const { dataset: instance } = readNaturalized(srPath);
  const report = reportView(instance);
  const ohif = ohifView(instance, sourcePaths);
  const problems = problemsOf(ohif, report, frameCountsOf(sourcePaths));
  process.stdout.write(`${JSON.stringify({ ohif, report, problems })}\n`);
  problems.forEach((problem) => process.stderr.write(`sr_read: ${problem}\n`));
  return problems.length ? 1 : 0;
}

process.exitCode = main(process.argv.slice(2));
