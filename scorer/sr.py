"""Results back to the PACS: one DICOM Structured Report per scored image (`--sr-out DIR`).

Each SR is a TID 1500 Measurement Report (Enhanced SR IOD) written with highdicom, in the
source image's study (patient and study attributes copied from it), referencing the source SOP
instance, with VerificationFlag UNVERIFIED (no person has confirmed it), and no pixel data.
Its content, one TID 1501 measurement group:

    Measurement  (DCM 122157 "Probability")  <p>  UCUM "1" (no units)
    Qualitative  (SCT 125605004 "Fracture of bone") = SCT 52101004 "Present" if p >= threshold,
                 else SCT 272519000 "Absent"
    Algorithm identification (TID 4019: DCM 111001 Algorithm Name, 111003 Algorithm Version,
                 111002 Algorithm Parameters: model id, threshold, positive class)
    Tracking identifier and UID, Source image (the scored instance)

The observer is the device (DCM 121007 "Device"): the model's name, version and id. Code
values are DICOM's (DCM), UCUM's and SNOMED CT's (SCT); "Fracture of bone" is the SNOMED CT
disorder concept, which DICOM's context groups do not list for this use.

UIDs are derived from the source SOP Instance UID and the model id only
(`pydicom.uid.generate_uid(entropy_srcs=...)`), so a rerun writes the same SR instance to the
same file name and a PACS receiving it again replaces rather than duplicates it. The SR series
is one per study and model: every image of a study scored by one model shares it.

`write_study_sr` writes one SR per study instead: a group per image, then a study group (the
maximum probability and the finding at the threshold), its UIDs from the StudyInstanceUID and
the model id.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

SERIES_NUMBER = 9901  # high, to sort after the acquisition's own series in a viewer
MANUFACTURER = "fxscore"
_UID_SALT = "fxscore-sr-v1"  # changing it would change every SR's UID: keep it


class SRError(ValueError):
    """The source image lacks what an SR must reference (its UIDs), or a value is invalid."""


def sr_uids(source_ds: Any, model_id: str) -> dict[str, str]:
    """The SR's SOP Instance, Series Instance and tracking UIDs for this source and model."""
    from pydicom.uid import generate_uid

    sop = str(source_ds.get("SOPInstanceUID") or "")
    study = str(source_ds.get("StudyInstanceUID") or "")
    if not sop or not study:
        raise SRError("the source image has no SOPInstanceUID or StudyInstanceUID: a DICOM SR "
                      "must reference both")
    return {
        "sop": generate_uid(entropy_srcs=[_UID_SALT, "instance", sop, model_id]),
        "series": generate_uid(entropy_srcs=[_UID_SALT, "series", study, model_id]),
        "tracking": generate_uid(entropy_srcs=[_UID_SALT, "tracking", sop, model_id]),
    }


def sr_path(out_dir: str | os.PathLike, source_ds: Any, model_id: str) -> Path:
    """Where write_sr puts the SR for this source and model: OUT_DIR/<SR SOP Instance UID>.dcm."""
    return Path(out_dir) / f"{sr_uids(source_ds, model_id)['sop']}.dcm"


def build_sr(source_ds: Any, probability: float, label: str, threshold: float,
             model_info: Mapping[str, Any]):
    """The SR data set (a highdicom EnhancedSR) for one scored image; see the module doc.

    source_ds: the scored image's header (pixel data not needed). model_info: "model_id"
    (required), "name", "version", "positive_class". label: the label the row carries; the
    finding is Present exactly when probability >= threshold (as the row's label says).
    """
    info = _model(model_info, threshold)
    uids = sr_uids(source_ds, info["model_id"])
    group = _group(uids["tracking"], f"{info['name']} fracture classification",
                   [source_ds], probability, label, info)
    return _report(source_ds, [source_ds], [group], uids, info,
                   f"{info['name']} fracture probability (not verified)")


def build_study_sr(sources: Sequence[Any], probabilities: Sequence[float],
                   labels: Sequence[str], threshold: float, model_info: Mapping[str, Any]):
    """One SR for a whole study: a measurement group per image (as build_sr), then one for the
    study (the maximum probability, and the finding at the threshold: Present when any image
    is), referencing every image. UIDs derive from the StudyInstanceUID and the model id."""
    if not sources or not (len(sources) == len(probabilities) == len(labels)):
        raise SRError("a study SR needs one probability and one label per source image")
    studies = {str(ds.get("StudyInstanceUID") or "") for ds in sources}
    if len(studies) != 1 or "" in studies:
        raise SRError("the images of a study SR must share one StudyInstanceUID")
    info = _model(model_info, threshold)
    uids = study_sr_uids(sources[0], info["model_id"])
    groups = [_group(sr_uids(ds, info["model_id"])["tracking"],
                     f"{info['name']} image {i + 1}", [ds], p, label, info)
              for i, (ds, p, label) in enumerate(zip(sources, probabilities, labels))]
    top = max(range(len(sources)), key=lambda i: float(probabilities[i]))
    groups.append(_group(uids["tracking"], f"{info['name']} study (maximum over images)",
                         list(sources), probabilities[top], labels[top], info))
    return _report(sources[0], list(sources), groups, uids, info,
                   f"{info['name']} study fracture probability (not verified)")


def study_sr_uids(source_ds: Any, model_id: str) -> dict[str, str]:
    """The study SR's UIDs: from the StudyInstanceUID and the model id only."""
    from pydicom.uid import generate_uid

    study = str(source_ds.get("StudyInstanceUID") or "")
    if not study:
        raise SRError("the source image has no StudyInstanceUID")
    return {
        "sop": generate_uid(entropy_srcs=[_UID_SALT, "study instance", study, model_id]),
        "series": generate_uid(entropy_srcs=[_UID_SALT, "series", study, model_id]),
        "tracking": generate_uid(entropy_srcs=[_UID_SALT, "study tracking", study, model_id]),
    }


def _model(model_info: Mapping[str, Any], threshold: float) -> dict[str, Any]:
    t = float(threshold)
    if not 0.0 <= t <= 1.0:
        raise SRError(f"threshold {threshold!r} must be in [0, 1]")
    model_id = str(model_info.get("model_id") or "")
    if not model_id:
        raise SRError("model_info needs a model_id (the SR's UIDs are derived from it)")
    return {"model_id": model_id, "threshold": t,
            "name": str(model_info.get("name") or "fxscore model"),
            "version": str(model_info.get("version") or "unversioned"),
            "positive_class": str(model_info.get("positive_class") or "fractured")}


def _group(tracking_uid: str, identifier: str, images: Sequence[Any], probability: float,
           label: str, info: Mapping[str, Any]):
    """One TID 1501 group: Probability, Fracture of bone Present/Absent, the algorithm."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    p, t = float(probability), info["threshold"]
    if not 0.0 <= p <= 1.0:
        raise SRError(f"probability {probability!r} and threshold {t!r} must be in [0, 1]")
    algorithm = hd.sr.AlgorithmIdentification(
        name=info["name"], version=info["version"],
        parameters=[f"model_id={info['model_id']}", f"threshold={t:g}",
                    f"positive_class={info['positive_class']}", f"label={label}"])
    fracture = hd.sr.CodedConcept("125605004", "SCT", "Fracture of bone")
    finding = codes.SCT.Present if p >= t else codes.SCT.Absent
    for ds in images:
        if not ds.get("SOPInstanceUID") or not ds.get("SOPClassUID"):
            raise SRError("the source image has no SOPInstanceUID or SOPClassUID: a DICOM SR "
                          "must reference both")
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=identifier),
        algorithm_id=algorithm,
        measurements=[hd.sr.Measurement(name=codes.DCM.Probability, value=p,
                                        unit=codes.UCUM.NoUnits, algorithm_id=algorithm)],
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=fracture, value=finding)],
        source_images=[hd.sr.SourceImageForMeasurementGroup(
            referenced_sop_class_uid=str(ds.SOPClassUID),
            referenced_sop_instance_uid=str(ds.SOPInstanceUID)) for ds in images])


def _report(first: Any, evidence: Sequence[Any], groups: list, uids: Mapping[str, str],
            info: Mapping[str, Any], description: str):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    name, version = info["name"], info["version"]
    observer = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=_device_uid(info["model_id"]), name=name, manufacturer_name=MANUFACTURER,
                model_name=f"{name} {version}", serial_number=info["model_id"])))
    report = hd.sr.MeasurementReport(
        observation_context=observer, procedure_reported=_procedure(first),
        imaging_measurements=groups, title=codes.DCM.ImagingMeasurementReport)
    return hd.sr.EnhancedSR(
        evidence=list(evidence), content=report[0],
        series_instance_uid=uids["series"], series_number=SERIES_NUMBER,
        sop_instance_uid=uids["sop"], instance_number=1, manufacturer=MANUFACTURER,
        is_complete=True, is_final=False, is_verified=False, series_description=description)


def write_sr(source_ds: Any, probability: float, label: str, threshold: float,
             model_info: Mapping[str, Any], out_dir: str | os.PathLike) -> Path:
    """Build the SR (see build_sr) and write it atomically to `sr_path(...)`; -> the path.

    A rerun rewrites the same file (same UIDs). out_dir is created if missing.
    """
    sr = build_sr(source_ds, probability, label, threshold, model_info)
    return _save(sr, Path(out_dir))


def write_study_sr(sources: Sequence[Any], probabilities: Sequence[float],
                   labels: Sequence[str], threshold: float, model_info: Mapping[str, Any],
                   out_dir: str | os.PathLike) -> Path:
    """Build the study SR (see build_study_sr) and write it atomically; -> the path
    (OUT_DIR/<its SOP Instance UID>.dcm)."""
    sr = build_study_sr(sources, probabilities, labels, threshold, model_info)
    return _save(sr, Path(out_dir))


def _save(sr: Any, out_dir: Path) -> Path:
    import io

    from .atomicfile import write_files

    path = out_dir / f"{sr.SOPInstanceUID}.dcm"
    out_dir.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    sr.save_as(buffer, enforce_file_format=True)
    write_files({path: buffer.getvalue()})
    return path


def _device_uid(model_id: str) -> str:
    from pydicom.uid import generate_uid
    return generate_uid(entropy_srcs=[_UID_SALT, "device", model_id])


def _procedure(source_ds: Any):
    """Procedure reported: the source's first Procedure Code, else 'Radiography' (SCT)."""
    import highdicom as hd

    seq = source_ds.get("ProcedureCodeSequence")
    if seq:
        item = seq[0]
        try:
            return hd.sr.CodedConcept(item.CodeValue, item.CodingSchemeDesignator,
                                      item.CodeMeaning)
        except (AttributeError, ValueError, TypeError):
            pass
    return hd.sr.CodedConcept("363680008", "SCT", "Radiographic imaging procedure")
