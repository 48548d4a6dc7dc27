"""Product silhouettes: one label map per (category, style), drawn once in canonical coordinates.

Coordinates are [-1, 1]^2 (x right, y down). Labels: 0 background/hole, 1 body (primary colour +
pattern), 2 detail in the secondary colour, 3 shade (darkened primary: seams, soles, handles),
4 hardware (dark grey: zips, buttons, laces). renderer.py poses, colours and patterns these maps.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

BODY, DETAIL, SHADE, HARDWARE = 1, 2, 3, 4


class Canvas:
  """PIL drawing in canonical [-1, 1] coordinates onto an R x R label map.

  `mirror=True` also draws the shape's mirror image about x = 0 (sleeves, straps, pockets).
  """

  def __init__(self, res: int):
    self.res = res
    self.img = Image.new("L", (res, res), 0)
    self.draw = ImageDraw.Draw(self.img)

  def p(self, x, y):
    return ((x + 1) * 0.5 * self.res, (y + 1) * 0.5 * self.res)

  def _width(self, width):
    return max(1, int(round(width * 0.5 * self.res)))

  def poly(self, pts, label, mirror=False):
    for shape in _with_mirror(pts, mirror):
      self.draw.polygon([self.p(x, y) for x, y in shape], fill=label)

  def rect(self, x0, y0, x1, y1, label):
    self.draw.rectangle([self.p(x0, y0), self.p(x1, y1)], fill=label)

  def ellipse(self, cx, cy, rx, ry, label):
    self.draw.ellipse([self.p(cx - rx, cy - ry), self.p(cx + rx, cy + ry)], fill=label)

  def pieslice(self, x0, y0, x1, y1, start, end, label):
    self.draw.pieslice([self.p(x0, y0), self.p(x1, y1)], start, end, fill=label)

  def arc(self, x0, y0, x1, y1, label, width):
    self.draw.arc([self.p(x0, y0), self.p(x1, y1)], 180, 360, fill=label, width=self._width(width))

  def line(self, pts, label, width, mirror=False):
    for shape in _with_mirror(pts, mirror):
      self.draw.line([self.p(x, y) for x, y in shape], fill=label, width=self._width(width))


def _with_mirror(points, mirror: bool):
  return (points, [(-x, y) for x, y in points]) if mirror else (points,)


def label_map(cat: str, style: str, res: int) -> np.ndarray:
  """Returns the (cat, style) silhouette as a uint8 [res, res] label map (labels in the module docstring)."""
  canvas = Canvas(res)
  _draw(canvas, cat, style)
  return np.asarray(canvas.img, np.uint8).copy()


def _draw(d: Canvas, cat: str, style: str):
  """Draws one silhouette; see the label legend above."""
  if cat == "dress":
    if style == "short sleeve":
      sl = [(-0.2, -0.78), (-0.52, -0.6), (-0.44, -0.4), (-0.27, -0.5)]
      d.poly(sl, BODY, mirror=True)
    elif style == "long sleeve":
      sl = [(-0.2, -0.78), (-0.5, -0.62), (-0.68, 0.22), (-0.52, 0.26), (-0.36, -0.3), (-0.27, -0.5)]
      d.poly(sl, BODY, mirror=True)
      cuff = [(-0.68, 0.22), (-0.52, 0.26), (-0.5, 0.18), (-0.665, 0.14)]
      d.poly(cuff, DETAIL, mirror=True)
    else:
      d.line([(-0.17, -0.78), (-0.15, -0.95)], SHADE, 0.05, mirror=True)
    d.poly([(-0.22, -0.8), (0.22, -0.8), (0.3, -0.62), (0.24, -0.15), (0.64, 0.9), (-0.64, 0.9),
            (-0.24, -0.15), (-0.3, -0.62)], BODY)
    d.ellipse(0, -0.82, 0.12, 0.1, 0)
    d.rect(-0.25, -0.19, 0.25, -0.11, DETAIL)
  elif cat in ("t-shirt", "jacket"):
    if cat == "jacket" and style == "hooded":
      d.ellipse(0, -0.8, 0.3, 0.2, BODY)
      d.ellipse(0, -0.78, 0.18, 0.13, SHADE)
    if cat == "t-shirt":
      sl = [(-0.25, -0.76), (-0.8, -0.42), (-0.64, -0.16), (-0.42, -0.3)]
      d.poly(sl, BODY, mirror=True)
    else:
      sl = [(-0.25, -0.76), (-0.62, -0.56), (-0.8, 0.62), (-0.58, 0.66), (-0.44, -0.15)]
      d.poly(sl, BODY, mirror=True)
      cuff = [(-0.8, 0.62), (-0.58, 0.66), (-0.565, 0.56), (-0.785, 0.52)]
      d.poly(cuff, SHADE, mirror=True)
    d.poly([(-0.2, -0.8), (0.2, -0.8), (0.44, -0.64), (0.44, 0.86), (-0.44, 0.86), (-0.44, -0.64)], BODY)
    if cat == "t-shirt":
      if style == "v-neck":
        d.poly([(-0.19, -0.81), (0.19, -0.81), (0, -0.44)], DETAIL)
        d.poly([(-0.12, -0.81), (0.12, -0.81), (0, -0.54)], 0)
      else:
        d.ellipse(0, -0.8, 0.19, 0.13, DETAIL)
        d.ellipse(0, -0.82, 0.13, 0.08, 0)
      if style == "pocket":
        d.rect(0.1, -0.45, 0.32, -0.2, DETAIL)
    else:
      d.line([(0, -0.62), (0, 0.86)], SHADE, 0.04)
      if style == "zip-up":
        d.poly([(-0.2, -0.84), (0.2, -0.84), (0.23, -0.66), (-0.23, -0.66)], DETAIL)
        d.line([(0, -0.66), (0, 0.86)], HARDWARE, 0.05)
        d.rect(-0.04, -0.66, 0.04, -0.56, HARDWARE)
      elif style == "buttoned":
        lapel = [(-0.2, -0.8), (-0.02, -0.3), (-0.12, -0.8)]
        d.poly(lapel, DETAIL, mirror=True)
        for y in (-0.2, 0.1, 0.4, 0.7):
          d.ellipse(0.07, y, 0.05, 0.05, HARDWARE)
      else:
        d.line([(0, -0.66), (0, 0.86)], HARDWARE, 0.04)
        d.line([(-0.08, -0.64), (-0.1, -0.3)], DETAIL, 0.035, mirror=True)
  elif cat == "trousers":
    if style == "wide leg":
      d.poly([(-0.42, -0.74), (0.42, -0.74), (0.66, 0.92), (0.1, 0.92), (0, -0.22), (-0.1, 0.92),
              (-0.66, 0.92)], BODY)
    else:
      d.poly([(-0.42, -0.74), (0.42, -0.74), (0.45, 0.92), (0.07, 0.92), (0, -0.3), (-0.07, 0.92),
              (-0.45, 0.92)], BODY)
    if style == "belted":
      d.rect(-0.43, -0.88, 0.43, -0.72, HARDWARE)
      d.rect(-0.09, -0.9, 0.09, -0.7, DETAIL)
    else:
      d.rect(-0.42, -0.86, 0.42, -0.73, DETAIL)
    d.line([(0, -0.73), (0, -0.35)], SHADE, 0.03)
  elif cat == "shorts":
    d.poly([(-0.52, -0.4), (0.52, -0.4), (0.64, 0.42), (0.08, 0.48), (0, 0.0), (-0.08, 0.48),
            (-0.64, 0.42)], BODY)
    d.rect(-0.52, -0.56, 0.52, -0.4, DETAIL)
    if style == "cargo":
      d.rect(-0.58, 0.0, -0.34, 0.3, SHADE); d.rect(0.34, 0.0, 0.58, 0.3, SHADE)
    elif style == "drawstring":
      d.line([(-0.03, -0.46), (-0.12, -0.05)], HARDWARE, 0.035, mirror=True)
    else:
      d.poly([(-0.64, 0.42), (-0.08, 0.48), (-0.07, 0.34), (-0.625, 0.28)], DETAIL, mirror=True)
  elif cat == "skirt":
    hem = {"mini": (0.6, 0.15), "midi": (0.62, 0.88), "pleated": (0.66, 0.55)}[style]
    d.poly([(-0.36, -0.62), (0.36, -0.62), (hem[0], hem[1]), (-hem[0], hem[1])], BODY)
    d.rect(-0.37, -0.76, 0.37, -0.62, DETAIL)
    if style == "pleated":
      for k in range(-3, 4):
        d.line([(0.36 * k / 4, -0.62), (hem[0] * k / 4, hem[1])], SHADE, 0.025)
  elif cat == "shoe":
    if style == "sneaker":
      d.poly([(-0.82, 0.3), (-0.8, -0.15), (-0.5, -0.26), (0.1, -0.1), (0.62, 0.04), (0.86, 0.2),
              (0.86, 0.3)], BODY)
      d.rect(-0.84, 0.3, 0.9, 0.46, DETAIL)
      for x in (-0.2, -0.05, 0.1, 0.25):
        d.line([(x, -0.13 + 0.05 * (x + 0.2)), (x + 0.08, 0.02 + 0.05 * (x + 0.2))], HARDWARE, 0.035)
      d.ellipse(-0.62, -0.2, 0.12, 0.05, SHADE)
    elif style == "heeled":
      d.poly([(-0.72, 0.0), (-0.56, -0.22), (-0.2, -0.06), (0.4, 0.14), (0.88, 0.3), (0.82, 0.42),
              (0.2, 0.38), (-0.55, 0.22)], BODY)
      d.poly([(-0.72, 0.0), (-0.55, 0.22), (-0.6, 0.78), (-0.7, 0.78)], SHADE)
      d.line([(0.2, 0.38), (0.82, 0.42)], DETAIL, 0.05)
    else:
      d.poly([(-0.7, 0.36), (-0.7, -0.78), (-0.24, -0.78), (-0.2, -0.06), (0.5, 0.04), (0.86, 0.2),
              (0.86, 0.36)], BODY)
      d.rect(-0.72, 0.36, 0.88, 0.5, SHADE)
      d.rect(-0.72, 0.36, -0.44, 0.62, SHADE)
      d.rect(-0.6, -0.88, -0.4, -0.74, DETAIL)
  elif cat == "bag":
    if style == "tote":
      d.arc(-0.36, -0.78, 0.36, 0.38, SHADE, 0.06)
      d.poly([(-0.6, -0.2), (0.6, -0.2), (0.72, 0.86), (-0.72, 0.86)], BODY)
      d.rect(-0.61, -0.22, 0.61, -0.12, DETAIL)
    elif style == "crossbody":
      d.line([(-0.46, 0.1), (0.0, -0.92)], SHADE, 0.05, mirror=True)
      d.rect(-0.52, 0.05, 0.52, 0.78, BODY)
      d.poly([(-0.52, 0.05), (0.52, 0.05), (0.52, 0.36), (0, 0.48), (-0.52, 0.36)], DETAIL)
    else:
      d.rect(-0.82, -0.3, 0.82, 0.36, BODY)
      d.poly([(-0.82, -0.3), (0.82, -0.3), (0, 0.1)], DETAIL)
      d.ellipse(0, 0.06, 0.06, 0.06, HARDWARE)
  elif cat == "hat":
    if style == "cap":
      d.pieslice(-0.56, -0.56, 0.56, 0.56, 180, 360, BODY)
      d.poly([(0.3, -0.04), (0.96, 0.02), (0.92, 0.14), (0.3, 0.1)], SHADE)
      d.rect(-0.56, -0.06, 0.56, 0.08, DETAIL)
      d.ellipse(0, -0.56, 0.06, 0.04, DETAIL)
    elif style == "beanie":
      d.pieslice(-0.55, -0.7, 0.55, 0.7, 180, 360, BODY)
      d.rect(-0.55, -0.02, 0.55, 0.2, BODY)
      d.rect(-0.58, 0.2, 0.58, 0.52, DETAIL)
      d.ellipse(0, -0.74, 0.17, 0.15, DETAIL)
    else:
      d.ellipse(0, 0.18, 0.95, 0.2, BODY)
      d.ellipse(0, -0.08, 0.42, 0.38, BODY)
      d.rect(-0.43, 0.0, 0.43, 0.12, DETAIL)
  elif cat == "scarf":
    if style == "fringed":
      d.poly([(-0.26, -0.82), (0.26, -0.82), (0.3, 0.7), (-0.22, 0.7)], BODY)
      d.rect(-0.27, -0.82, 0.27, -0.7, SHADE)
      for x in np.linspace(-0.2, 0.26, 7):
        d.line([(x, 0.7), (x, 0.94)], DETAIL, 0.035)
    elif style == "square":
      d.poly([(0, -0.88), (0.88, 0), (0, 0.88), (-0.88, 0)], DETAIL)
      d.poly([(0, -0.74), (0.74, 0), (0, 0.74), (-0.74, 0)], BODY)
    else:
      d.ellipse(0, 0, 0.7, 0.82, BODY)
      d.ellipse(0, 0, 0.36, 0.5, 0)
      d.poly([(-0.7, 0.05), (-0.36, 0.05), (-0.36, 0.2), (-0.68, 0.25)], SHADE)
  else:
    raise ValueError(f"no silhouette for category {cat!r}")
