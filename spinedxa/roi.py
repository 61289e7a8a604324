"""Region of interest of an AP lumbar spine DXA scan: the L1-L4 column, located per scan from the image itself.

DXA software analyses the L1-L4 vertebral bodies (ISCD 2019 adult official positions: "use L1-L4 for spine BMD
measurement"); our models and the baseline see the same region, cropped from the processed image, rather than the
whole field of view (at the processed 256 px, a vertebral body in the whole image is ~11 px wide at 64 px input,
and the trabecular texture that carries the label is gone).

Method (no anatomy template, no fixed crop; every length is relative to the column's own measured width, so the
method does not depend on the field of view or the pixel size):

1. **Column axis.** On a lightly smoothed image, a ridge filter per row (mean of a centre band minus the mean of its two
   flanks, at several band widths) finds where the brightest wide vertical band is. A robust quadratic fit of the
   per-row centres (RANSAC, then least squares on the inliers) gives the axis ``x = c(y)``: it follows a scoliotic
   curve and ignores rows disturbed by osteophytes, bowel gas or the pelvis.
2. **Straightening.** The image is resampled along the axis into a strip one column-width wide; its mean along the
   rows is the axial profile: bright vertebral bodies, dark disc spaces.
3. **Discs.** Disc spaces are the prominent minima of the detrended axial profile, at least 0.45 body widths apart
   (a lumbar body plus disc is ~0.8 body widths tall: Zhou et al. 2000, Eur Spine J 9:242).
4. **Levels.** The lowest lumbar disc (L5/S1) is the lowest disc above which the column stays narrow and bright and
   below which it widens into the sacrum and the iliac wings (lateral brightness rises); L4/L5 is the disc above it,
   and L1-L4 are the four bodies above L4/L5, ending at the T12/L1 disc. Where no pelvis is in view, the four bodies
   are the run of four whose centre is nearest the image centre, and ``method`` says so.
5. **Box.** The axis-aligned box holding the L1-L4 column between the T12/L1 and L4/L5 discs (all axis positions in
   those rows, plus half a body width and a margin on each side), padded to the output aspect ratio.

A scan where step 1 finds no column (no ridge clearly above the noise, or fewer than half the rows on the axis) or
step 3 fewer than five discs in a regular rhythm raises :class:`RoiNotFound`; ingest quarantines it (reason
``no_roi``). Nothing is ever silently cropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image
from scipy import ndimage, signal

from spinedxa.contracts.manifest import ROI_ASPECT as ASPECT  # the ROI boxes' height / width
from spinedxa.files import atomic_path

if TYPE_CHECKING:
    import pandas as pd

#: Candidate band widths of the ridge filter, as fractions of the image width (a lumbar body is ~45 mm: 15-45 % of
#: the 100-300 mm fields of view of AP spine scans).
BAND_FRACTIONS = (0.12, 0.16, 0.2, 0.25, 0.3, 0.36, 0.44)
#: Ridge contrast (band minus flanks) must exceed this many robust noise SDs of the image.
MIN_RIDGE_SNR = 3.0
#: Share of rows in which the traced axis must stand out from its surroundings.
MIN_AXIS_ROWS = 0.5
#: Longest side (pixels) at which the column is searched (larger images are shrunk first; see :func:`locate`).
LOCATE_SIDE = 256
#: Smallest side (pixels) of an image on which the column can be located.
MIN_SIDE = 48
#: A disc space must darken the column by at least this share of the column's contrast against its flanks
#: (measured on the default synthetic cohort: disc dips are 0.8-2x the contrast; noise dips on a uniform bar < 0.2).
MIN_DISC_DEPTH = 0.4
#: Minimum number of disc spaces in a regular rhythm (T12/L1 ... L4/L5 are five).
MIN_DISCS = 5


class RoiNotFound(ValueError):
    """No lumbar column (or not enough of it) was found in the image; the message says which step failed."""


@dataclass(frozen=True)
class Roi:
    """The located L1-L4 region, in pixel coordinates of the image it was located on.

    Attributes:
        top, left, height, width: the box (may extend beyond the image; :func:`crop` pads with zeros).
        method: ``pelvis`` (levels counted from L5/S1) or ``centre`` (no pelvis in view: the four central bodies).
        body_width: measured column width in pixels.
        n_discs: disc spaces found along the axis.
    """

    top: int
    left: int
    height: int
    width: int
    method: str
    body_width: float
    n_discs: int


def _noise_sd(img: np.ndarray) -> float:
    """Robust SD of the pixel noise: the MAD of the difference between the image and its 3x3 median."""
    resid = img - ndimage.median_filter(img, size=3)
    return float(1.4826 * np.median(np.abs(resid - np.median(resid)))) + 1e-6


def _ridge(smooth: np.ndarray, band: int) -> np.ndarray:
    """Per row and column: mean of a ``band``-wide centre minus the mean of the two flanks of ``band / 2`` beside it."""
    h, w = smooth.shape
    csum = np.concatenate([np.zeros((h, 1)), np.cumsum(smooth, axis=1)], axis=1)
    half, flank = band // 2, max(band // 2, 2)
    x = np.arange(w)
    lo, hi = np.clip(x - half, 0, w), np.clip(x + half + 1, 0, w)
    llo, rhi = np.clip(x - half - flank, 0, w), np.clip(x + half + 1 + flank, 0, w)
    centre = (csum[:, hi] - csum[:, lo]) / np.maximum(hi - lo, 1)
    left = (csum[:, lo] - csum[:, llo]) / np.maximum(lo - llo, 1)
    right = (csum[:, rhi] - csum[:, hi]) / np.maximum(rhi - hi, 1)
    out = centre - 0.5 * (left + right)
    valid = (x - half - flank >= 0) & (x + half + flank < w)
    out[:, ~valid] = -np.inf
    return out


def _axis(smooth: np.ndarray, noise: float) -> tuple[np.ndarray, int, float]:
    """Trace the column axis. Returns (axis x per row, band width in pixels, median contrast of the column).

    The band width is the one whose ridge response is strongest (median over rows). The axis is the path of maximal
    summed ridge response from the top row to the bottom one that moves at most one pixel sideways per row (dynamic
    programming, as in seam carving): a vertebral column is continuous and nearly vertical, while the pelvis, ribs
    or bowel gas that can outshine it in a few rows cannot pull a continuous path away. The path is then smoothed
    over one band width.

    Raises:
        RoiNotFound: no band clearly brighter than its flanks along most of the path.
    """
    h, w = smooth.shape
    best = None
    for frac in BAND_FRACTIONS:
        band = max(int(round(frac * w)), 4)
        r = _ridge(smooth, band)
        score = float(np.median(r.max(axis=1)))
        if best is None or score > best[0]:
            best = (score, band, r)
    _, band, r = best
    finite = np.where(np.isfinite(r), r, -1e3)
    total = finite.copy()
    step = np.zeros((h, w), dtype=np.int8)
    for y in range(1, h):
        prev = total[y - 1]
        cand = np.stack([np.r_[-np.inf, prev[:-1]], prev, np.r_[prev[1:], -np.inf]])  # from x-1, x, x+1
        step[y] = np.argmax(cand, axis=0) - 1
        total[y] += cand.max(axis=0)
    path = np.empty(h, dtype=int)
    path[-1] = int(np.argmax(total[-1]))
    for y in range(h - 1, 0, -1):
        path[y - 1] = path[y] + step[y, path[y]]
    strength = finite[np.arange(h), path]
    on_ridge = strength > MIN_RIDGE_SNR * noise
    if on_ridge.mean() < MIN_AXIS_ROWS:
        raise RoiNotFound(f"no vertebral column: the brightest continuous vertical band stands out from its "
                          f"surroundings in only {on_ridge.mean():.0%} of the rows (need {MIN_AXIS_ROWS:.0%} at "
                          f"{MIN_RIDGE_SNR} noise SDs)")
    axis = ndimage.gaussian_filter1d(path.astype(float), sigma=band / 2, mode="nearest")
    return axis, band, float(np.median(strength))


def _straighten(img: np.ndarray, axis: np.ndarray, half_width: float, n: int = 33) -> np.ndarray:
    """Resample ``img`` along the axis: row y, offsets -half_width..+half_width (``n`` samples) from ``axis[y]``."""
    h = img.shape[0]
    offsets = np.linspace(-half_width, half_width, n)
    ys = np.repeat(np.arange(h, dtype=float)[:, None], n, axis=1)
    xs = axis[:, None] + offsets[None, :]
    return ndimage.map_coordinates(img, [ys, xs], order=1, mode="constant", cval=0.0)


def _body_width(strip: np.ndarray, half_width: float) -> float:
    """Width (pixels) of the bright centre of the straightened strip at half its contrast above the flanks."""
    profile = np.median(strip, axis=0)
    n = len(profile)
    peak = float(profile[n // 4: 3 * n // 4].max())
    floor = float(min(profile[: n // 8 + 1].mean(), profile[-(n // 8 + 1):].mean()))
    above = profile >= floor + 0.5 * (peak - floor)
    centre = n // 2
    lo = centre
    while lo > 0 and above[lo - 1]:
        lo -= 1
    hi = centre
    while hi < n - 1 and above[hi + 1]:
        hi += 1
    return (hi - lo + 1) * (2 * half_width / (n - 1))


def _discs(profile: np.ndarray, body: float, contrast: float) -> np.ndarray:
    """Rows of the disc spaces along the axis: the deepest minima of the axial profile in one regular rhythm.

    The rhythm (body + disc height) is the first peak of the profile's autocorrelation between 0.5 and 1.6 body
    widths; minima at least 0.45 periods apart whose prominence is a quarter of the profile's 10-90 % range, and at
    least :data:`MIN_DISC_DEPTH` of the column's contrast against its flanks (a uniform bright bar has no discs),
    are disc candidates. The discs are the longest chain of candidates with neighbours 0.6-1.5 periods apart
    (dynamic programming over the candidates, so a dark spot inside a body is skipped instead of breaking the
    chain); among equally long chains, the one with the deepest minima.
    """
    detrended = profile - ndimage.uniform_filter1d(profile, size=max(int(3.0 * body), 3), mode="nearest")
    centred = detrended - detrended.mean()
    ac = np.correlate(centred, centred, mode="full")[len(centred) - 1:]
    lo, hi = max(int(0.5 * body), 2), min(int(1.6 * body) + 1, len(ac) - 1)
    if hi <= lo:
        return np.array([], dtype=int)
    period = float(lo + np.argmax(ac[lo:hi]))
    spread = float(np.subtract(*np.percentile(profile, [90, 10])))
    minima, props = signal.find_peaks(-profile, distance=max(int(0.45 * period), 2),
                                      prominence=max(0.25 * spread, MIN_DISC_DEPTH * contrast))
    if len(minima) == 0:
        return minima
    depth = props["prominences"]
    length = np.ones(len(minima), dtype=int)
    score = depth.copy()
    previous = np.full(len(minima), -1)
    for j in range(len(minima)):
        for i in range(j):
            gap = minima[j] - minima[i]
            if 0.6 * period <= gap <= 1.5 * period and (length[i] + 1, score[i] + depth[j]) > (length[j], score[j]):
                length[j], score[j], previous[j] = length[i] + 1, score[i] + depth[j], i
    end = max(range(len(minima)), key=lambda k: (length[k], score[k]))
    chain = []
    while end >= 0:
        chain.append(int(minima[end]))
        end = previous[end]
    return np.array(chain[::-1], dtype=int)


def locate(image: np.ndarray) -> Roi:
    """Locate the L1-L4 region of an AP lumbar spine image (2-D, bone bright, any intensity scale).

    Images larger than :data:`LOCATE_SIDE` are searched on a copy shrunk to that size (the column and its discs are
    tens of pixels there) and the box is scaled back: the same box within a pixel or two, at a fraction of the cost.

    Raises:
        RoiNotFound: the image is too small, holds no vertebral column, or too few disc spaces (message says which).
    """
    img = np.asarray(image, dtype=np.float64)
    if img.ndim == 2 and max(img.shape) > LOCATE_SIDE:
        scale = max(img.shape) / LOCATE_SIDE
        size = (max(1, round(img.shape[1] / scale)), max(1, round(img.shape[0] / scale)))
        small = np.asarray(Image.fromarray(img.astype(np.float32)).resize(size, Image.Resampling.BOX), dtype=np.float64)
        box = _locate(small)
        return Roi(int(round(box.top * scale)), int(round(box.left * scale)), int(round(box.height * scale)),
                   int(round(box.height * scale / ASPECT)), box.method, round(box.body_width * scale, 2), box.n_discs)
    return _locate(img)


def _locate(img: np.ndarray) -> Roi:
    """:func:`locate` at the image's own size."""
    if img.ndim != 2 or min(img.shape) < MIN_SIDE:
        raise RoiNotFound(f"image of shape {img.shape} is too small to locate the lumbar column (need >= {MIN_SIDE} px)")
    lo, hi = np.percentile(img, (1, 99))
    if hi <= lo:
        raise RoiNotFound("no vertebral column: the image is blank")
    img = np.clip((img - lo) / (hi - lo), 0.0, 1.0)
    h, w = img.shape
    smooth = ndimage.gaussian_filter(img, sigma=max(1.0, min(h, w) / 128))
    noise = _noise_sd(img)
    axis, band, contrast = _axis(smooth, noise)
    strip = _straighten(smooth, axis, half_width=band)
    body = _body_width(strip, band)
    core = _straighten(smooth, axis, half_width=max(body / 3, 1.0), n=9)
    profile = core.mean(axis=1)
    discs = _discs(profile, body, contrast)
    if len(discs) < MIN_DISCS:
        raise RoiNotFound(f"no lumbar column: {len(discs)} disc space(s) in a regular rhythm along the axis "
                          f"(need {MIN_DISCS})")
    top_disc, bottom_disc, method = _levels(smooth, axis, body, discs)
    rows = np.arange(max(top_disc, 0), min(bottom_disc, h - 1) + 1)
    margin = 0.1 * body
    x0 = float(axis[rows].min() - body / 2 - 0.5 * margin - 0.35 * body)
    x1 = float(axis[rows].max() + body / 2 + 0.5 * margin + 0.35 * body)
    y0, y1 = top_disc - margin, bottom_disc + margin
    bh, bw = y1 - y0, x1 - x0
    if bh < ASPECT * bw:  # pad to the aspect ratio around the centre
        y0, y1 = (y0 + y1) / 2 - ASPECT * bw / 2, (y0 + y1) / 2 + ASPECT * bw / 2
    else:
        x0, x1 = (x0 + x1) / 2 - bh / ASPECT / 2, (x0 + x1) / 2 + bh / ASPECT / 2
    top, left = int(round(y0)), int(round(x0))
    height = int(round(y1 - y0))
    return Roi(top, left, height, int(round(height / ASPECT)), method, round(float(body), 2), int(len(discs)))


def _crest_row(smooth: np.ndarray, axis: np.ndarray, body: float) -> int | None:
    """Row of the iliac crests (top of the iliac wings), or None when no pelvis is in view.

    Per side, the mean brightness of the lateral region (beyond 1.5 body widths from the axis) is followed down the
    image; the wings begin where it rises most steeply in the lower 60 % of the rows, and that rise must be large
    against the region's own row-to-row variation (no wing: soft tissue only). Both sides must agree within one body
    width; the higher of the two is taken.
    """
    h, w = smooth.shape
    dist = np.arange(w)[None, :] - axis[:, None]
    rows = []
    for side in (-1.0, 1.0):
        region = side * dist > 1.5 * body
        counts = region.sum(axis=1)
        if (counts < 3).mean() > 0.5:
            continue
        mean = np.where(counts > 0, (smooth * region).sum(axis=1) / np.maximum(counts, 1), np.nan)
        mean = ndimage.uniform_filter1d(np.nan_to_num(mean, nan=float(np.nanmedian(mean))), size=max(int(body / 4), 3))
        rise = np.r_[0.0, np.diff(mean)]
        rise = ndimage.uniform_filter1d(rise, size=max(int(body / 4), 3))
        lo = int(0.4 * h)
        y = lo + int(np.argmax(rise[lo:]))
        gain = float(mean[min(y + int(body / 2), h - 1)] - mean[max(y - int(body / 2), 0)])
        upper_noise = float(np.std(np.diff(mean[: lo])) * body / 2 + 1e-6)
        if gain > 0.05 and gain > 4 * upper_noise:
            rows.append(y)
    if not rows or (len(rows) == 2 and abs(rows[0] - rows[1]) > body):
        return None
    return int(min(rows))


def _levels(smooth: np.ndarray, axis: np.ndarray, body: float, discs: np.ndarray) -> tuple[int, int, str]:
    """(T12/L1 disc row, L4/L5 disc row, method) from the discs along the axis.

    With a pelvis in view, L4/L5 is the lowest disc at or above the crest line (the intercristal line passes
    through L4/L5 or the L4 body in most adults: Chakraverty et al. 2007, J Anat 210:232); without one, the run of
    four bodies whose centre is nearest the image centre (AP spine scans are centred on L1-L4 by protocol).

    Raises:
        RoiNotFound: fewer than four disc spaces above L4/L5 are in view.
    """
    h = smooth.shape[0]
    crest = _crest_row(smooth, axis, body)
    period = float(np.median(np.diff(discs)))
    if crest is not None:
        above = np.flatnonzero(discs <= crest + 0.25 * period)
        if len(above):
            i45 = int(above[-1])
            if i45 < 4:
                raise RoiNotFound(f"lumbar column cut off: only {i45} disc space(s) above L4/L5 in view (need 4)")
            return int(discs[i45 - 4]), int(discs[i45]), "pelvis"
    idx = int(np.argmin([abs((discs[i] + discs[i + 4]) / 2 - h / 2) for i in range(len(discs) - 4)]))
    return int(discs[idx]), int(discs[idx + 4]), "centre"


def whole(image: np.ndarray, aspect: float = ASPECT) -> Roi:
    """The whole image as the ROI, padded (centred) to ``aspect`` (height / width): for cohorts of other anatomy, or
    prepared as crops elsewhere (``ingest.roi: whole``, square: :func:`spinedxa.contracts.manifest.roi_aspect`)."""
    h, w = image.shape[:2]
    height, width = (h, int(round(h / aspect))) if h >= aspect * w else (int(round(w * aspect)), w)
    return Roi((h - height) // 2, (w - width) // 2, height, width, "whole", float("nan"), 0)


def crop(image: np.ndarray, roi: Roi) -> np.ndarray:
    """The ROI box of ``image`` (zero-padded where the box extends beyond the image)."""
    h, w = image.shape
    out = np.zeros((roi.height, roi.width), dtype=image.dtype)
    y0, x0 = max(roi.top, 0), max(roi.left, 0)
    y1, x1 = min(roi.top + roi.height, h), min(roi.left + roi.width, w)
    if y1 > y0 and x1 > x0:
        out[y0 - roi.top: y1 - roi.top, x0 - roi.left: x1 - roi.left] = image[y0:y1, x0:x1]
    return out


def extract(image: np.ndarray, roi: Roi, height: int, aspect: float = ASPECT) -> np.ndarray:
    """The ROI of a uint16 image, resized to ``height x height / aspect`` (Lanczos, anti-aliased), as uint16.

    Every scan's L1-L4 region then has the same size in pixels whatever the patient's build or the field of view.
    """
    width = max(1, int(round(height / aspect)))
    box = crop(np.asarray(image, dtype=np.float32), roi)
    resized = np.asarray(Image.fromarray(box).resize((width, height), Image.Resampling.LANCZOS))
    return np.clip(np.rint(resized), 0, 65535).astype(np.uint16)


def write_examples_figure(manifest: "pd.DataFrame", ingested: Path, path: Path, classes: Sequence[str],
                          per_class: int = 3) -> None:
    """A PNG of located ROIs: per class, the first ``per_class`` accepted scans (by source) with their box drawn,
    beside the ROI image the models see. Scans are numbered, never named (file names can hold identifiers).

    Raises:
        ValueError: no accepted scan to show.
    """
    from matplotlib.figure import Figure  # the object API: no pyplot state, no display backend
    from matplotlib.patches import Rectangle

    from spinedxa.contracts import png16

    accepted = manifest[manifest["status"] == "accepted"].sort_values("source", kind="stable")
    rows = [r for c in classes for r in accepted[accepted["label"] == c].head(per_class).itertuples(index=False)]
    if not rows:
        raise ValueError(f"{path}: no accepted scan to show")
    fig = Figure(figsize=(1.9 * 2 * per_class, 3.3 * len(classes)))
    axes = fig.subplots(len(classes), 2 * per_class, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    counters = dict.fromkeys(classes, 0)
    for number, r in enumerate(rows, start=1):
        row, col = list(classes).index(r.label), 2 * counters[r.label]
        counters[r.label] += 1
        scan, roi_img = png16.read(ingested / r.image), png16.read(ingested / r.roi)
        axes[row, col].imshow(scan, cmap="gray", vmin=0, vmax=1)
        axes[row, col].add_patch(Rectangle((int(r.roi_left), int(r.roi_top)), int(r.roi_width), int(r.roi_height),
                                           fill=False, edgecolor="yellow", linewidth=1.0))
        axes[row, col].set_title(f"scan {number}: {r.label}\nROI ({r.roi_method})", fontsize=7)
        axes[row, col + 1].imshow(roi_img, cmap="gray", vmin=0, vmax=1)
        axes[row, col + 1].set_title("model input (L1-L4)", fontsize=7)
    fig.suptitle("Located L1-L4 regions of interest (yellow) and the ROI images the models and the baseline see",
                 fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
