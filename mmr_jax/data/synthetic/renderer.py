"""Product images: a silhouette posed, coloured, patterned and lit over a studio background.

The nuisances a model must learn to ignore are all here: background tone and texture, drop shadow,
scale, position, rotation, mirror, lighting level and gradient, partial occlusion, pixel noise.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from mmr_jax.data.synthetic import silhouettes
from mmr_jax.data.synthetic.vocabulary import CATEGORIES, COLORS, STYLES

_HARDWARE_RGB = (55, 55, 60)  # silhouettes.HARDWARE: zips, buttons, laces

# Backgrounds: studio tones chosen (by Monte Carlo over jitter, texture and lighting) to stay >~45 RGB
# away from every palette colour, so a colour word stays a property of the product, not the backdrop.
_BACKGROUNDS = np.asarray([
    (170, 190, 215),  # pale blue
    (215, 195, 160),  # sand
    (175, 170, 215),  # lavender
    (150, 200, 200),  # pale teal
    (150, 200, 130),  # pistachio
    (70, 80, 100),    # slate
    (50, 65, 95),     # navy slate
], np.float32)
_OCCLUDERS = np.asarray([(224, 172, 140), (198, 134, 100), (141, 85, 60), (90, 90, 90), (200, 200, 200),
                         (60, 110, 120)], np.float32)


def _lattice(rng: np.random.Generator, t: np.ndarray, period: float) -> np.ndarray:
  """Returns t in units of `period` with a random phase: the cell coordinate of a periodic pattern."""
  return t * np.float32(1 / period) + np.float32(rng.random())


class Renderer:
  """Renders product images from latent attributes; templates are built once per image size.

  Everything is sampled in numpy at the output resolution: output pixel -> inverse pose -> canonical
  (u, v) -> label map lookup, and the pattern evaluated at (u, v).
  """

  def __init__(self, image_size: int):
    self.size = image_size
    # Canonical maps finer than the object's largest on-screen size, so nearest lookup is not blocky.
    self.res = R = int(round(image_size * 1.5))
    # Coverage is prefiltered in canonical space with a blur about one output pixel wide: sampling it
    # at pixel centres antialiases the silhouette for the cost of the one lookup that gives the label.
    blur = 0.3 * R / (0.78 * image_size)  # ~ box of one output pixel at mean scale, as a Gaussian sigma
    self.maps = {}
    for cat in CATEGORIES:
      for style in STYLES[cat]:
        lab = silhouettes.label_map(cat, style, R)
        # A zero border makes every out-of-range lookup (clipped to the border) background.
        lab[:2, :] = lab[-2:, :] = lab[:, :2] = lab[:, -2:] = 0
        mask = Image.fromarray(np.where(lab > 0, 255, 0).astype(np.uint8), "L")
        cover = np.asarray(mask.filter(ImageFilter.GaussianBlur(blur)), np.uint16)
        self.maps[(cat, style)] = (lab.astype(np.uint16) | (cover << 8)).ravel()
    pix = (np.arange(image_size, dtype=np.float32) + 0.5) / image_size * 2 - 1
    self.x, self.y = np.meshgrid(pix, pix)  # [S, S] output coordinates in [-1, 1]
    # Sensor noise comes from a fixed bank (sliced and flipped per image): drawing 3*S*S normals per image
    # would cost more than the rest of the rendering.
    bank_rng = np.random.default_rng(12345)
    self.noise_bank = bank_rng.standard_normal((8, image_size, image_size, 3), dtype=np.float32)

  def _pattern(self, rng, pattern, u, v) -> np.ndarray | None:
    """Returns a bool map like u: True where the pattern shows the secondary colour (None for solid)."""
    if pattern == "solid":
      return None
    if pattern == "striped":
      angle = (0.0, 0.5 * np.pi, 0.25 * np.pi, -0.25 * np.pi)[rng.integers(4)]
      period = rng.uniform(0.17, 0.28)
      t = u * np.float32(np.cos(angle) / period) + v * np.float32(np.sin(angle) / period)
      t += np.float32(rng.random())
      return (t - np.floor(t)) < rng.uniform(0.3, 0.45)
    if pattern == "dotted":
      period = rng.uniform(0.2, 0.28)
      radius = rng.uniform(0.28, 0.36)
      b = _lattice(rng, v, period)
      fb = np.floor(b)
      a = _lattice(rng, u, period) + 0.5 * (fb % 2)  # staggered rows
      a -= np.floor(a) + 0.5
      b -= fb + 0.5
      return a * a + b * b < radius * radius
    if pattern == "checked":
      period = rng.uniform(0.22, 0.32)
      duty = rng.uniform(0.2, 0.28)
      a = _lattice(rng, u, period)
      b = _lattice(rng, v, period)
      return ((a - np.floor(a)) < duty) | ((b - np.floor(b)) < duty)
    if pattern == "floral":
      period = rng.uniform(0.3, 0.4)
      a = _lattice(rng, u, period)
      b = _lattice(rng, v, period)
      ia, ib = np.floor(a), np.floor(b)
      # Per-cell jitter from a hash of the cell index, so flowers are not on a visible grid.
      h = np.sin(ia * 12.9898 + ib * 78.233) * 43758.5453
      h -= np.floor(h)
      fa = a - ia - 0.5 - 0.25 * (h - 0.5)
      fb = b - ib - 0.5 + 0.25 * (h - 0.5)
      r = np.sqrt(fa * fa + fb * fb)
      theta = np.arctan2(fb, fa) + 6.283 * h
      return (r < 0.42 * (0.6 + 0.4 * np.cos(5 * theta))) | (r < 0.12)
    raise ValueError(f"unknown pattern {pattern!r}")

  def render(self, rng: np.random.Generator, gt: dict[str, Any], occlusion_rate: float = 0.25,
             noise_sigma_max: float = 6.0) -> np.ndarray:
    """Returns the product image, uint8 [S, S, 3]."""
    cat = gt["category"]
    S, R = self.size, self.res
    # Pose: scale, rotation, translation, mirror.
    s = rng.uniform(0.62, 0.95)
    max_rot = 25.0 if cat in ("bag", "hat", "shoe") else 12.0
    theta = np.deg2rad(rng.uniform(-max_rot, max_rot))
    tx, ty = rng.uniform(-1, 1, size=2) * (1.0 - s) * 0.8
    flip = -1.0 if rng.random() < 0.5 else 1.0
    # Output (x, y) -> canonical pixel units: (u, v) = F * Rot(-theta) * ((x, y) - t) / s, then * R/2 + R/2.
    c, sn = np.cos(theta) / s, np.sin(theta) / s
    h = R / 2
    a00, a01, a02 = flip * c * h, flip * sn * h, h - flip * (c * tx + sn * ty) * h
    a10, a11, a12 = -sn * h, c * h, h - (c * ty - sn * tx) * h
    x, y = self.x, self.y
    pu = x * np.float32(a00) + y * np.float32(a01)  # [S, S] at pixel centres
    pv = x * np.float32(a10) + y * np.float32(a11)
    # One lookup gives label (low byte) and prefiltered coverage (high byte) at each pixel centre.
    iu = np.clip(pu + np.float32(a02), 0, R - 1).astype(np.int32)
    iv = np.clip(pv + np.float32(a12), 0, R - 1).astype(np.int32)
    packed = np.take(self.maps[(cat, gt["style"])], iv * R + iu)  # [S, S] uint16
    labels = (packed & 0xFF).astype(np.uint8)
    alpha = (packed >> 8).astype(np.float32)[..., None] * np.float32(1 / 255)  # [S, S, 1]
    u = (pu + np.float32(a02)) * np.float32(1 / h) - 1
    v = (pv + np.float32(a12)) * np.float32(1 / h) - 1
    pat = self._pattern(rng, gt["pattern"], u, v)
    if pat is not None:
      labels = labels + np.uint8(5 - silhouettes.BODY) * ((labels == silhouettes.BODY) & pat)

    # Colour per label (label 5 = body pixel painted by the pattern). Label 0 takes the body colour:
    # partly covered edge pixels whose centre falls outside the silhouette blend towards the product.
    primary = np.asarray(COLORS[gt["primary_color"]], np.float32)
    secondary = np.asarray(COLORS[gt["secondary_color"]], np.float32)
    table = np.stack([primary, primary, secondary, primary * 0.62, np.asarray(_HARDWARE_RGB, np.float32),
                      secondary])
    obj = np.take(table, labels, axis=0)  # [S, S, 3]

    # Background: a studio tone, jittered, with one of several textures.
    bg_base = (_BACKGROUNDS[rng.integers(len(_BACKGROUNDS))] + rng.uniform(-10, 10, size=3)).astype(np.float32)
    texture = rng.integers(4)
    if texture == 0:
      tex = None
    elif texture == 1:
      tex = y * np.float32(14 * rng.uniform(0.5, 1)) + x * np.float32(14 * rng.uniform(-0.5, 0.5))
    elif texture == 2:
      coarse = rng.uniform(-12, 12, size=(4, 4)).astype(np.float32)
      tex = np.asarray(Image.fromarray(coarse, "F").resize((S, S), Image.Resampling.BILINEAR))
    else:
      freq = rng.uniform(10, 25)
      tex = 7.0 * np.sin(np.float32(freq) * (y + 0.15 * np.sin(3 * x)) + np.float32(rng.uniform(0, 6.3)))
    bg = np.broadcast_to(bg_base, (S, S, 3)) if tex is None else bg_base + tex[..., None]
    # Drop shadow: the alpha shifted down-right darkens the background beneath.
    d = max(1, S // 32)
    shadow = np.ones_like(alpha)
    shadow[d:, d:] -= np.float32(rng.uniform(0.15, 0.3)) * alpha[:-d, :-d]
    # Lighting: a level, a directional gradient, and a soft falloff across the object (reads as volume).
    phi = rng.uniform(0, 2 * np.pi)
    light = np.float32(rng.uniform(0.92, 1.08)) * (
        1.0 + x * np.float32(rng.uniform(0, 0.06) * np.cos(phi)) + y * np.float32(rng.uniform(0, 0.06) * np.sin(phi)))
    volume = 1.0 - np.float32(0.12 / (s * s)) * (x - np.float32(tx)) ** 2
    img = bg * (shadow * (1.0 - alpha)) + obj * (alpha * volume[..., None])

    if rng.random() < occlusion_rate:
      # Another object (a hand, a prop) over an edge of the product.
      ang = rng.uniform(0, 2 * np.pi)
      cx, cy = tx + 0.75 * s * np.cos(ang), ty + 0.75 * s * np.sin(ang)
      rx, ry = rng.uniform(0.15, 0.3, size=2)
      if rng.random() < 0.5:
        occ = ((x - np.float32(cx)) * np.float32(1 / rx)) ** 2 + ((y - np.float32(cy)) * np.float32(1 / ry)) ** 2 < 1
      else:
        occ = (np.abs(x - np.float32(cx)) < rx) & (np.abs(y - np.float32(cy)) < ry)
      img[occ] = _OCCLUDERS[rng.integers(len(_OCCLUDERS))]

    img *= light[..., None]
    sigma = np.float32(rng.uniform(0, noise_sigma_max))
    noise = self.noise_bank[rng.integers(len(self.noise_bank))]
    if rng.random() < 0.5:
      noise = noise[::-1]
    if rng.random() < 0.5:
      noise = noise[:, ::-1]
    img += sigma * noise + np.float32(0.5)
    np.clip(img, 0, 255, out=img)
    return img.astype(np.uint8)
