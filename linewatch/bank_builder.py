"""Builds a template bank from a folder of good images and calibrates its threshold.

This is the offline on-boarding stage (SAM-LAD 3.1, stage 1): every good image goes through
the models once; the bank keeps what a frame needs of it. Calibration pools the scores of
good images judged against a bank without them (the validation folder, if any, and
leave-one-out over the bank's own good images: each judged against the others), fits
the tail of their distribution (linewatch.detector.calibration) and stores the threshold for
the target false-reject rate, the rate to expect there with its confidence interval, and the
scores.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from linewatch import __version__
from linewatch.config import Config
from linewatch.detector.backends import get_backend
from linewatch.detector.bank import BankManifest, TemplateBank
from linewatch.detector.calibration import Calibration, calibrate
from linewatch.detector.fusion import branch_normalisation, fuse_scores
from linewatch.detector.describe import pad_masks
from linewatch.detector.inspector import ENCODE_STAGES, JUDGE_STAGES, Batch, Inspector
from linewatch.detector.models import Models, build_models, select_device
from linewatch.good_images import BankBuildError, GoodImages, read_good_images
from linewatch.images import is_grey


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield start, items[start:start + size]


def working_size(images: list[np.ndarray], size: int) -> torch.Tensor:
    """RGB uint8 images -> (B, 3, size, size), grey ones -> (B, 1, size, size), float in [0, 1],
    area-resized one at a time (so that only the small results are held together)."""
    return torch.cat([
        torch.nn.functional.interpolate(torch.from_numpy(img.reshape(*img.shape[:2], -1)).permute(2, 0, 1)[None].float()
                                        / 255.0, size=(size, size), mode="area")
        for img in images
    ])


def encode_references(inspector: Inspector, images: list[np.ndarray], batch_size: int, progress: bool) -> dict:
    """Run the reference side of every good image once: backbone, upsampler, segmenter, DCGA."""
    parts: dict[str, list] = {k: [] for k in ("retrieval", "features", "masks", "valid", "boxes", "descriptors",
                                              "shapes", "textures", "identities")}
    bar = tqdm(total=len(images), desc="encoding good images", unit="img", disable=not progress)
    for _, chunk in _batches(images, batch_size):
        batch = inspector.run(Batch(images=chunk), ENCODE_STAGES)
        enc = batch.encoded
        parts["retrieval"].append(enc.retrieval.cpu())
        parts["features"].append(enc.upsampled.half().cpu())
        parts["masks"].extend(m.cpu() for m in enc.masks.per_image())
        parts["descriptors"].extend(enc.descriptors.cpu().unbind(0))
        if enc.shapes is not None:
            parts["shapes"].extend(enc.shapes.cpu().unbind(0))
            parts["textures"].extend(enc.textures.cpu().unbind(0))
        if enc.identities is not None:
            parts["identities"].extend(enc.identities.cpu().unbind(0))
        bar.update(len(chunk))
    bar.close()
    size = tuple(parts["features"][0].shape[-2:])
    soft, valid, boxes = pad_masks(parts["masks"], size, torch.device("cpu"))
    n = soft.shape[1]
    descriptors = torch.zeros(len(images), n, parts["descriptors"][0].shape[-1])
    for i, d in enumerate(parts["descriptors"]):
        descriptors[i, : d.shape[0]] = d[:n]
    shapes = torch.zeros(len(images), n, parts["shapes"][0].shape[-1] if parts["shapes"] else 0)
    textures = torch.zeros(len(images), n, parts["textures"][0].shape[-1] if parts["textures"] else 0)
    identities = torch.zeros(len(images), n, parts["identities"][0].shape[-1] if parts["identities"] else 0)
    for i, (d, t) in enumerate(zip(parts["shapes"], parts["textures"])):
        shapes[i, : d.shape[0]] = d[:n]
        textures[i, : t.shape[0]] = t[:n]
    for i, d in enumerate(parts["identities"]):
        identities[i, : d.shape[0]] = d[:n]
    return {
        "retrieval": torch.cat(parts["retrieval"]),
        "features": torch.cat(parts["features"]),
        "masks": soft.half(),
        "object_valid": valid,
        "descriptors": descriptors * valid[..., None],
        "boxes": boxes,
        "object_noise": torch.ones(valid.shape),
        "shapes": shapes * valid[..., None],
        "textures": textures * valid[..., None],
        "identities": identities * valid[..., None],
    }


def inspect_images(inspector: Inspector, images: list[np.ndarray], batch_size: int, progress: bool,
                   desc: str = "scoring validation images") -> list:
    """InspectionResults of `images` against the inspector's bank."""
    results = []
    bar = tqdm(total=len(images), desc=desc, unit="img", disable=not progress)
    for _, chunk in _batches(images, batch_size):
        results.extend(inspector.inspect(chunk))
        bar.update(len(chunk))
    bar.close()
    return results


def _by_branch(components: list[dict[str, float]]) -> dict[str, np.ndarray]:
    """Per-image {branch: raw score} -> {branch: (N,) scores}."""
    names = components[0].keys() if components else ()
    return {name: np.array([c[name] for c in components], dtype=np.float64) for name in names}


def judge_bank_images(inspector: Inspector, batch_size: int, progress: bool, desc: str):
    """Each good image of the bank judged against the rest (leave-one-out), from the bank's
    own tensors (no model runs again). Yields (indices, batch after measure)."""
    z = inspector.bank.size
    bar = tqdm(total=z, desc=desc, unit="img", disable=not progress)
    for start in range(0, z, batch_size):
        indices = torch.arange(start, min(z, start + batch_size), device=inspector.device)
        batch = inspector.run(inspector.bank_batch(indices), JUDGE_STAGES)
        yield indices.cpu(), batch
        bar.update(len(indices))
    bar.close()


def object_noise_levels(inspector: Inspector, batch_size: int, progress: bool) -> torch.Tensor:
    """(Z, N) peak of each good object's raw anomaly map when its image is judged against the
    rest of the bank (leave-one-out)."""
    bank = inspector.bank
    noise = torch.ones(bank.object_valid.shape)
    for indices, batch in judge_bank_images(inspector, batch_size, progress, "measuring good-part variation"):
        peaks = batch.object_maps.flatten(2).amax(2).cpu()  # (b, N)
        noise[indices] = peaks[:, : noise.shape[1]]
    valid = bank.object_valid.cpu()
    return torch.where(valid, noise, torch.ones_like(noise))


def build_bank(
    config: Config,
    good_dir: str | Path,
    validation_dir: str | Path | None = None,
    models: Models | None = None,
    batch_size: int = 8,
    progress: bool = True,
    log: Callable[[str], None] = lambda message: None,
) -> TemplateBank:
    """Encode the good images of `good_dir`, calibrate, and return the bank (not yet saved).
    The folders are read and checked first (`read_good_images`: ImageError, BankBuildError)."""
    return build_bank_from(config, read_good_images(config, good_dir, validation_dir), models, batch_size, progress, log)


def build_bank_from(
    config: Config,
    images: GoodImages,
    models: Models | None = None,
    batch_size: int = 8,
    progress: bool = True,
    log: Callable[[str], None] = lambda message: None,
) -> TemplateBank:
    """`build_bank` of images already read and checked (`read_good_images`)."""
    det = config.detector
    device = select_device(det.device)
    good_dir, good_paths, good = images.good_dir, images.good_paths, images.good
    validation_dir, validation = images.validation_dir, images.validation
    k = det.k_references
    backend = get_backend(det.backend)
    models = models or build_models(det, device)
    started = time.time()
    # what the backend learns from the good images (the classic background colour model) goes
    # into the bank; the encoder runs on models carrying it, `models` themselves stay as given
    state = backend.fit(models, working_size(good, det.image_size))
    if state:
        log(f"{backend.name}: fitted on the good images ({', '.join(sorted(state))})")
    encoder = Inspector(det, backend.load_state(models, state), bank=None, device=device)
    tensors = encode_references(encoder, good, batch_size, progress)
    identity = encoder.identity()
    content = hashlib.sha256()
    content.update(repr(sorted(identity.items())).encode())
    content.update(tensors["retrieval"].numpy().tobytes())
    manifest = BankManifest(
        linewatch_version=__version__,
        identity=identity,
        settings=det.fingerprint_settings(),  # what config_hash covers, to name a difference
        images=len(good),
        source=str(Path(good_dir).resolve()),
        source_files=[p.name for p in good_paths],
        source_shape=list(good[0].shape),  # [H, W] for grey images
        colour_mode="mono" if is_grey(good[0]) else "colour",
        sample_window=list(det.sample_window),
        image_size=det.image_size,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        calibration=Calibration(threshold=None),  # judged with threshold inf until calibrated below
        bank_id=content.hexdigest()[:12],
    )
    bank = TemplateBank(**tensors, manifest=manifest, segmenter_state=state)

    if det.measure.normalize_objects:
        bank.object_noise = object_noise_levels(Inspector(det, models, bank=bank, device=device), batch_size, progress)
    judge = Inspector(det, models, bank=bank, device=device)
    # raw branch scores of the good images: the validation images, and leave-one-out over the
    # bank (each good image against k others)
    held_out, loo, sources = [], [], []
    if validation is not None:
        held_out = [r.components for r in inspect_images(judge, validation, batch_size, progress)]
        sources.append(f"validation folder {Path(validation_dir).resolve()} ({len(validation)})")
    if bank.size > k:
        loo = [r.components for _, batch in judge_bank_images(judge, batch_size, progress, "scoring good images")
               for r in batch.results]
        sources.append(f"leave-one-out over the good images ({bank.size})")
    good_scores = _by_branch(held_out + loo)
    try:
        if det.score.source == "fused":  # each branch in units of its spread over all good scores there are
            # each branch's spread, and the good scores it came from (as the calibration keeps its own)
            manifest.score_normalisation = {
                name: dict(stats, scores=[round(float(v), 6) for v in good_scores[name]])
                for name, stats in branch_normalisation(good_scores).items()
            }
        scores = fuse_scores(good_scores, manifest.score_normalisation, det.score.source)
        calibration = calibrate(scores, config.calibration.target_false_reject_rate,
                                confidence=config.calibration.confidence)
    except ValueError as e:
        raise BankBuildError(f"{good_dir}: cannot calibrate the threshold: {e}") from None
    # what the bank file will hold (the scores rounded), so that this bank and its file judge alike
    manifest.calibration = Calibration.from_manifest(dict(calibration.to_manifest(), source=" + ".join(sources)))
    if calibration.warning:
        log(f"WARNING: calibration: {calibration.warning}")
    manifest.build_seconds = round(time.time() - started, 2)
    return bank
