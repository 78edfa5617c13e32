"""Procedural pedestrian crops with identities and annotator-style captions.

Why it looks the way it does: a tiny CLIP (64x32 input) must learn text->image retrieval from these in minutes, so
garments are large flat regions in a small palette of nameable colours, always named with the same colour word.
Difficulty comes from nuisance variation per image (view, pose, scale, position, background, lighting, blur, JPEG
quality), from captions that mention only 3-6 attributes, and from "sibling" identities that share all but 1-2
attributes with another identity of the same split.

Every random draw comes from random.Random seeded with a string built from (seed, identity, image index), so the
output does not depend on the number of workers or on the order in which images are produced.
"""
from __future__ import annotations

import io
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .records import Entry

# Ten to twelve colours that a human (and the caption vocabulary) names unambiguously.
PALETTE = {
    "red": (205, 30, 35), "blue": (40, 95, 225), "green": (35, 155, 60), "yellow": (240, 215, 35),
    "black": (22, 22, 24), "white": (238, 238, 235), "grey": (128, 128, 128), "pink": (245, 145, 190),
    "purple": (125, 45, 165), "orange": (245, 130, 20), "brown": (115, 70, 35), "navy": (20, 30, 95),
}
COLORS = list(PALETTE)
HAIR = {"black": (20, 18, 18), "brown": (95, 60, 30), "blonde": (225, 195, 110), "grey": (160, 160, 160)}
SKIN = [(240, 205, 180), (215, 170, 130), (170, 120, 85), (110, 75, 50)]
UPPER_TYPES = ["t-shirt", "shirt", "jacket", "sweater", "coat", "hoodie"]
ACCESSORIES = ["backpack", "handbag", "hat", "glasses"]


# ----------------------------------------------------------------------------------------------- identities ---

def _other(rng, options, current):
    return rng.choice([o for o in options if o != current])


def sample_identity(rng: random.Random) -> dict:
    a = {"gender": rng.choice(["male", "female"])}
    a["build"] = rng.choice(["slim", "average", "average", "heavy"])
    female = a["gender"] == "female"
    a["hair_length"] = rng.choices(["long", "short"], [0.7, 0.3])[0] if female else \
        rng.choices(["short", "long", "bald"], [0.85, 0.08, 0.07])[0]
    a["hair_color"] = rng.choices(list(HAIR), [0.45, 0.3, 0.15, 0.1])[0]
    a["upper_type"] = rng.choice(UPPER_TYPES)
    a["sleeve"] = _sleeve_for(rng, a["upper_type"])
    a["upper_color"] = rng.choice(COLORS)
    a["pattern"] = rng.choices([None, "stripes", "checks", "logo"], [0.6, 0.15, 0.1, 0.15])[0]
    a["pattern_color"] = _other(rng, COLORS, a["upper_color"]) if a["pattern"] else None
    a["lower_type"] = rng.choices(["trousers", "jeans", "shorts", "skirt"], [0.35, 0.2, 0.15, 0.3] if female
                                  else [0.5, 0.3, 0.2, 0.0])[0]
    a["lower_color"] = rng.choice(["blue", "navy", "black", "grey"]) if a["lower_type"] == "jeans" \
        else rng.choice(COLORS)
    a["shoe_color"] = rng.choices(COLORS, [1, 1, 0.5, 0.5, 3, 3, 1, 0.5, 0.3, 0.3, 1.5, 0.5])[0]
    a["backpack"] = rng.choice(COLORS) if rng.random() < 0.3 else None
    a["handbag"] = rng.choice(COLORS) if rng.random() < (0.3 if female else 0.1) else None
    a["hat"] = rng.choice(COLORS) if rng.random() < 0.2 else None
    a["glasses"] = rng.random() < 0.2
    a["skin"] = rng.randrange(len(SKIN))
    return a


def _sleeve_for(rng, upper_type):
    if upper_type == "t-shirt":
        return "short"
    if upper_type == "shirt":
        return rng.choice(["short", "long"])
    return "long"


def _mutate(rng: random.Random, a: dict) -> str:
    """Change one salient attribute of a copy-in-progress; returns the attribute's name."""
    what = rng.choice(["upper_color", "lower_color", "pattern", "shoe_color", "hair", "backpack", "handbag",
                       "hat", "lower_type", "upper_type"])
    if what == "upper_color":
        a["upper_color"] = _other(rng, COLORS, a["upper_color"])
        if a["pattern_color"] == a["upper_color"]:
            a["pattern_color"] = _other(rng, COLORS, a["upper_color"])
    elif what == "lower_color":
        a["lower_color"] = _other(rng, COLORS, a["lower_color"])
        if a["lower_type"] == "jeans":
            a["lower_type"] = "trousers"
    elif what == "pattern":
        a["pattern"] = _other(rng, [None, "stripes", "checks", "logo"], a["pattern"])
        a["pattern_color"] = _other(rng, COLORS, a["upper_color"]) if a["pattern"] else None
    elif what == "shoe_color":
        a["shoe_color"] = _other(rng, COLORS, a["shoe_color"])
    elif what == "hair":
        a["hair_color"] = _other(rng, list(HAIR), a["hair_color"])
    elif what in ("backpack", "handbag", "hat"):
        a[what] = None if a[what] else rng.choice(COLORS)
    elif what == "lower_type":
        opts = ["trousers", "shorts", "skirt"] if a["gender"] == "female" else ["trousers", "shorts"]
        a["lower_type"] = _other(rng, opts, a["lower_type"])
    else:
        a["upper_type"] = _other(rng, UPPER_TYPES, a["upper_type"])
        a["sleeve"] = _sleeve_for(rng, a["upper_type"])
    return what


def make_identities(num_ids: int, seed: int, sibling_prob: float = 0.4) -> list[tuple[dict, int]]:
    """[(attributes, family)] for identities 0..num_ids-1. A family is one base identity plus, with probability
    sibling_prob, 1-2 siblings that differ from it in 1-2 attributes: hard negatives for retrieval."""
    out: list[tuple[dict, int]] = []
    fam = 0
    while len(out) < num_ids:
        rng = random.Random(f"{seed}:family:{fam}")
        base = sample_identity(rng)
        members = [base]
        if rng.random() < sibling_prob:
            for _ in range(rng.choice([1, 1, 2])):
                sib = dict(base)
                changed = {_mutate(rng, sib) for _ in range(rng.choice([1, 2]))}
                if any(sib == {k: v for k, v in m.items() if k != "differs_in"} for m in members):
                    continue  # e.g. a bag toggled on and off again: not a distinct identity
                sib["differs_in"] = sorted(changed)
                members.append(sib)
        if len(members) > 1:
            for m in members:  # the json says which identities are siblings and how they differ from the base
                m["family"] = fam
                m.setdefault("differs_in", [])
        for m in members[: num_ids - len(out)]:
            out.append((m, fam))
        fam += 1
    return out


def assign_splits(identities, val_frac: float, test_frac: float, seed: int) -> list[str]:
    """Split per identity, keeping families together (siblings land in the same split, so evaluation has hard
    negatives) and test/val getting their fraction of identities, not of families."""
    fams = sorted({f for _, f in identities})
    random.Random(f"{seed}:splits").shuffle(fams)
    size = {}
    for _, f in identities:
        size[f] = size.get(f, 0) + 1
    n = len(identities)
    target = {"test": round(test_frac * n), "val": round(val_frac * n)}
    fam_split, got = {}, {"test": 0, "val": 0}
    for f in fams:
        for s in ("test", "val"):
            if got[s] < target[s]:
                fam_split[f] = s
                got[s] += size[f]
                break
        else:
            fam_split[f] = "train"
    return [fam_split[f] for _, f in identities]


def synthetic_entries(num_ids, images_per_id, seed, val_frac, test_frac) -> dict[str, list[Entry]]:
    ids = make_identities(num_ids, seed)
    splits = assign_splits(ids, val_frac, test_frac, seed)
    out: dict[str, list[Entry]] = {}
    for pid, ((attrs, _), split) in enumerate(zip(ids, splits)):
        for j in range(images_per_id):
            out.setdefault(split, []).append(Entry(orig_id=pid, image=f"{pid:06d}/{j:03d}.jpg", source="synthetic",
                                                   attributes=attrs, origin="synthetic", index=j))
    return out


# ---------------------------------------------------------------------------------------------------- render ---

def _muted(rng):
    g = rng.randint(60, 200)
    return tuple(int(0.55 * g + 0.45 * rng.randint(0, 255)) for _ in range(3))


def _background(rng, w, h):
    c1, c2 = np.array(_muted(rng), np.float32), np.array(_muted(rng), np.float32)
    t = np.linspace(0.0, 1.0, h if rng.random() < 0.7 else w, dtype=np.float32)[:, None]
    ramp = (c1 * (1 - t) + c2 * t).astype(np.uint8)
    arr = np.broadcast_to(ramp[:, None, :], (h, w, 3)) if len(ramp) == h else \
        np.broadcast_to(ramp[None, :, :], (h, w, 3))
    img = Image.fromarray(np.ascontiguousarray(arr), "RGB")
    d = ImageDraw.Draw(img)
    if rng.random() < 0.6:  # ground plane
        gy = int(h * rng.uniform(0.7, 0.9))
        d.rectangle([0, gy, w, h], fill=_muted(rng))
    for _ in range(rng.randint(0, 4)):  # clutter: poles, windows, other objects
        x0, y0 = rng.uniform(-0.2, 1.0) * w, rng.uniform(-0.1, 0.9) * h
        x1, y1 = x0 + rng.uniform(0.05, 0.5) * w, y0 + rng.uniform(0.05, 0.5) * h
        (d.rectangle if rng.random() < 0.7 else d.ellipse)([x0, y0, x1, y1], fill=_muted(rng))
    return img, d


def _pattern(d, box, a, u):
    x0, y0, x1, y1 = box
    pc = PALETTE[a["pattern_color"]]
    step = max(2.0, 0.045 * u)
    lw = max(1, int(round(step * 0.45)))
    if a["pattern"] in ("stripes", "checks"):
        y = y0 + step * 0.6
        while y < y1:
            d.line([x0, y, x1, y], fill=pc, width=lw)
            y += step
    if a["pattern"] == "checks":
        x = x0 + step * 0.6
        while x < x1:
            d.line([x, y0, x, y1], fill=pc, width=lw)
            x += step


@dataclass(frozen=True)
class _Figure:
    """One person as placed on the small canvas of one image. Every body part is drawn from it, back to front
    (_BODY_PARTS); only placing it and the camera draw from the image's random stream."""
    a: dict          # the identity's attributes
    view: str        # front, back or side
    u: float         # body height in canvas pixels
    top: float       # canvas y of the top of the head
    cx: float        # canvas x of the body's axis
    sw: float        # shoulder width
    stride: float    # walking pose in [-1, 1]: leg and arm swing
    lw: int          # leg width
    skin: tuple
    up: tuple        # upper garment colour
    low: tuple       # lower garment colour
    hair: tuple

    def y(self, f: float) -> float:
        """Canvas y of the point a fraction f of the body height below the top of the head."""
        return self.top + f * self.u

    @property
    def head_r(self) -> float:
        return 0.058 * self.u

    @property
    def hy(self) -> float:  # centre of the head
        return self.y(0.075)


def _place_figure(a: dict, rng: random.Random, ch: int, cw: int) -> _Figure:
    view = rng.choices(["front", "back", "side"], [0.4, 0.35, 0.25])[0]
    u = ch * rng.uniform(0.82, 0.97)  # body height: the person fills most of the crop
    top = (ch - u) * rng.uniform(0.15, 0.85)
    cx = cw * (0.5 + rng.uniform(-0.07, 0.07))
    build = {"slim": 0.24, "average": 0.28, "heavy": 0.34}[a["build"]]
    sw = build * u * (0.62 if view == "side" else 1.0)
    stride = rng.uniform(-1, 1)
    lw = max(2, int(u * (0.12 if a["build"] == "heavy" else 0.1)))
    return _Figure(a, view, u, top, cx, sw, stride, lw, skin=SKIN[a["skin"]], up=PALETTE[a["upper_color"]],
                   low=PALETTE[a["lower_color"]], hair=HAIR[a["hair_color"]])


def _long_hair_behind(d: ImageDraw.ImageDraw, f: _Figure) -> None:
    """Long hair hangs behind the body in front/side views."""
    if f.a["hair_length"] == "long" and f.view != "back":
        d.rectangle([f.cx - f.head_r * 1.15, f.hy, f.cx + f.head_r * 1.15, f.y(0.27)], fill=f.hair)


def _legs(d: ImageDraw.ImageDraw, f: _Figure) -> None:
    """Legs in the lower garment (or bare), and shoes."""
    a, u, cx, sw, lw, low, skin = f.a, f.u, f.cx, f.sw, f.lw, f.low, f.skin
    hip_y, knee_y, ank_y = f.y(0.52), f.y(0.72), f.y(0.94)
    spread = (0.05 if f.view == "side" else 0.035) * u
    for side in (-1, 1):
        hx = cx + side * (sw * 0.22 if f.view != "side" else sw * 0.05)
        fx = hx + side * abs(f.stride) * spread if f.view != "side" else cx + side * f.stride * spread * 2
        kx = (hx + fx) / 2
        if a["lower_type"] in ("trousers", "jeans"):
            d.line([hx, hip_y, kx, knee_y, fx, ank_y], fill=low, width=lw, joint="curve")
        elif a["lower_type"] == "shorts":
            d.line([hx, hip_y, kx, knee_y, fx, ank_y], fill=skin, width=max(1, lw - 1), joint="curve")
            d.line([hx, hip_y, (hx + kx) / 2, (hip_y + knee_y) / 2 + 0.03 * u], fill=low, width=lw + 1)
        else:
            d.line([hx, hip_y, kx, knee_y, fx, ank_y], fill=skin, width=max(1, lw - 1), joint="curve")
        shoe_dx = 0.05 * u if f.view == "side" else 0.0
        d.rectangle([fx - lw * 0.6, ank_y - 0.01 * u, fx + lw * 0.6 + shoe_dx, f.y(1.0)],
                    fill=PALETTE[a["shoe_color"]])


def _skirt_or_hips(d: ImageDraw.ImageDraw, f: _Figure) -> None:
    waist = f.sw * (1.0 if f.a["build"] == "heavy" else 0.88)
    cx, y = f.cx, f.y
    if f.a["lower_type"] == "skirt":
        d.polygon([(cx - waist / 2, y(0.5)), (cx + waist / 2, y(0.5)), (cx + waist * 0.85, y(0.76)),
                   (cx - waist * 0.85, y(0.76))], fill=f.low)
    else:  # hips
        d.rectangle([cx - waist / 2, y(0.48), cx + waist / 2, y(0.52) + 0.02 * f.u], fill=f.low)


def _backpack_behind(d: ImageDraw.ImageDraw, f: _Figure) -> None:
    """A backpack seen from the side sits behind the torso."""
    if f.a["backpack"] and f.view == "side":
        d.rounded_rectangle([f.cx - f.sw * 0.5 - 0.1 * f.u, f.y(0.18), f.cx - f.sw * 0.3, f.y(0.44)], radius=2,
                            fill=PALETTE[f.a["backpack"]])


def _torso(d: ImageDraw.ImageDraw, f: _Figure) -> None:
    a, u, cx, up = f.a, f.u, f.cx, f.up
    bottom = f.y(0.68) if a["upper_type"] == "coat" else f.y(0.52)
    box = [cx - f.sw / 2, f.y(0.16), cx + f.sw / 2, bottom]
    d.rounded_rectangle(box, radius=max(1, int(0.03 * u)), fill=up)
    if a["pattern"] in ("stripes", "checks"):
        _pattern(d, box, a, u)
    elif a["pattern"] == "logo" and f.view != "back":
        r = 0.045 * u
        d.ellipse([cx - r, f.y(0.27) - r, cx + r, f.y(0.27) + r], fill=PALETTE[a["pattern_color"]])
    if a["upper_type"] in ("jacket", "coat") and f.view == "front":
        d.line([cx, f.y(0.17), cx, bottom], fill=tuple(int(c * 0.6) for c in up), width=max(1, int(0.012 * u)))


def _arms(d: ImageDraw.ImageDraw, f: _Figure) -> None:
    """Arms: sleeve colour down to the elbow or the wrist, then skin; a handbag hangs from the last one."""
    a, u, cx, y, view = f.a, f.u, f.cx, f.y, f.view
    aw = max(2, int(0.065 * u))
    arms = (1,) if view == "side" else (-1, 1)
    for side in arms:
        sx = cx + side * (f.sw / 2 + aw * 0.3) if view != "side" else cx
        swing = -f.stride * 0.06 * u * (side if view != "side" else 1)
        ex, ey = sx + swing * 0.5, y(0.34)
        hx_, hy_ = sx + swing, y(0.5)
        if a["sleeve"] == "long":
            d.line([sx, y(0.18), ex, ey, hx_, hy_ - 0.02 * u], fill=f.up, width=aw, joint="curve")
            d.ellipse([hx_ - aw / 2, hy_ - 0.03 * u, hx_ + aw / 2, hy_ + 0.015 * u], fill=f.skin)
        else:
            d.line([ex, ey, hx_, hy_], fill=f.skin, width=max(1, aw - 1))
            d.line([sx, y(0.18), (sx + ex) / 2, y(0.27)], fill=f.up, width=aw + 1)
        if a["handbag"] and side == arms[-1]:
            hb = PALETTE[a["handbag"]]
            d.line([sx, y(0.18), hx_, y(0.43)], fill=hb, width=1)
            d.rectangle([hx_ - 0.06 * u, y(0.43), hx_ + 0.05 * u, y(0.53)], fill=hb)


def _head(d: ImageDraw.ImageDraw, f: _Figure) -> None:
    """Neck, head, hair, glasses and hat."""
    a, u, cx, hy, head_r, hair = f.a, f.u, f.cx, f.hy, f.head_r, f.hair
    d.rectangle([cx - head_r * 0.45, f.y(0.11), cx + head_r * 0.45, f.y(0.17)], fill=f.skin)
    head = [cx - head_r, hy - head_r * 1.15, cx + head_r, hy + head_r * 1.15]
    if f.view == "back" and a["hair_length"] != "bald":
        d.ellipse(head, fill=hair)
        if a["hair_length"] == "long":
            d.rectangle([cx - head_r * 1.1, hy, cx + head_r * 1.1, f.y(0.28)], fill=hair)
    else:
        d.ellipse(head, fill=f.skin)
        if a["hair_length"] != "bald":
            d.chord([head[0], head[1], head[2], head[3] - head_r * 0.7], 180, 360, fill=hair)
            if f.view == "side":
                d.pieslice(head, 270, 90 + 180, fill=hair)
        if a["glasses"]:
            gy = hy - head_r * 0.05
            d.line([cx - head_r * 0.8, gy, cx + head_r * 0.8, gy], fill=(15, 15, 15), width=max(1, int(0.02 * u)))
    if a["hat"]:
        hc = PALETTE[a["hat"]]
        d.chord([head[0] - 1, head[1] - 1, head[2] + 1, hy + head_r * 0.2], 180, 360, fill=hc)
        d.rectangle([head[0] - 0.02 * u, hy - head_r * 0.35, head[2] + 0.02 * u, hy - head_r * 0.15], fill=hc)


def _backpack_over(d: ImageDraw.ImageDraw, f: _Figure) -> None:
    """A backpack: a big patch over the back in back view, straps in front view."""
    if not f.a["backpack"]:
        return
    bp, cx, sw = PALETTE[f.a["backpack"]], f.cx, f.sw
    if f.view == "back":
        d.rounded_rectangle([cx - sw * 0.36, f.y(0.19), cx + sw * 0.36, f.y(0.46)], radius=2, fill=bp)
    elif f.view == "front":
        for side in (-1, 1):
            d.line([cx + side * sw * 0.3, f.y(0.16), cx + side * sw * 0.3, f.y(0.38)], fill=bp,
                   width=max(1, int(0.025 * f.u)))


_BODY_PARTS = (_long_hair_behind, _legs, _skirt_or_hips, _backpack_behind, _torso, _arms, _head, _backpack_over)


def _camera(img: Image.Image, rng: random.Random, height: int, width: int) -> Image.Image:
    """Blur, upscale to the output size, and light the scene."""
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.8)))
    img = img.resize((width, height), Image.BILINEAR)
    # Lighting: global gain plus a mild colour cast, applied as a per-channel lookup table (fast, no float image).
    gain = rng.uniform(0.75, 1.2)
    lut = []
    for _ in range(3):
        g = gain * rng.uniform(0.93, 1.07)
        b = rng.uniform(-12, 12)
        lut += [min(255, max(0, int(v * g + b))) for v in range(256)]
    return img.point(lut)


def render(a: dict, rng: random.Random, height: int, width: int) -> Image.Image:
    # Draw on a small canvas and upscale: cheap, and the bilinear upscale doubles as the camera's blur.
    s = rng.uniform(0.4, 0.62)
    ch, cw = max(24, int(height * s)), max(12, int(width * s))
    img, d = _background(rng, cw, ch)
    figure = _place_figure(a, rng, ch, cw)
    for part in _BODY_PARTS:
        part(d, figure)
    return _camera(img, rng, height, width)


# -------------------------------------------------------------------------------------------------- captions ---

def _an(word):
    return ("an " if word[0] in "aeiou" else "a ") + word


def _join(items, rng):
    if len(items) == 1:
        return items[0]
    sep = ", and " if (len(items) > 2 and rng.random() < 0.3) else " and "
    return ", ".join(items[:-1]) + sep + items[-1]


UPPER_WORDS = {"t-shirt": ["t-shirt", "T-shirt", "tee"], "shirt": ["shirt", "top"], "jacket": ["jacket"],
               "sweater": ["sweater", "jumper"], "coat": ["coat", "long coat"], "hoodie": ["hoodie"]}
LOWER_WORDS = {"trousers": ["trousers", "pants"], "jeans": ["jeans"], "shorts": ["shorts"], "skirt": ["skirt"]}


def _upper(a, rng):
    c, t = a["upper_color"], rng.choice(UPPER_WORDS[a["upper_type"]])
    sl = ""
    if a["upper_type"] in ("t-shirt", "shirt") and rng.random() < 0.6:
        sl = rng.choice(["short-sleeved ", "short sleeve "] if a["sleeve"] == "short"
                        else ["long-sleeved ", "long sleeve "])
    p, pc = a["pattern"], a["pattern_color"]
    if p and rng.random() < 0.8:
        if p == "stripes":
            return rng.choice([f"{_an(c)} {sl}{t} with {pc} stripes", f"{_an(c)} and {pc} striped {sl}{t}"])
        if p == "checks":
            return rng.choice([f"{_an(c)} and {pc} checked {sl}{t}", f"{_an(c)} {sl}{t} with a {pc} check pattern"])
        return rng.choice([f"{_an(c)} {sl}{t} with a {pc} logo", f"{_an(c)} {sl}{t} with a {pc} logo on the front"])
    return f"{_an(c)} {sl}{t}"


def _lower(a, rng):
    c, t = a["lower_color"], rng.choice(LOWER_WORDS[a["lower_type"]])
    if a["lower_type"] == "skirt":
        return f"{_an(c)} {t}"
    return rng.choice([f"{c} {t}", f"{c} {t}", f"a pair of {c} {t}"])


def _hair(a, rng):
    if a["hair_length"] == "bald":
        return "a shaved head"
    form = rng.random()
    if form < 0.6:
        return f"{a['hair_length']} {a['hair_color']} hair"
    if form < 0.8:
        return f"{a['hair_color']} hair"
    return f"{a['hair_length']} hair"


def caption(a: dict, rng: random.Random) -> str:
    """One annotator-style description mentioning 3-6 attributes."""
    female = a["gender"] == "female"
    he, his = ("she", "her") if female else ("he", "his")
    wear, carry = [], []
    if rng.random() < 0.97:
        wear.append(_upper(a, rng))
    if rng.random() < 0.9 or not wear:
        wear.append(_lower(a, rng))
    if rng.random() < 0.3:
        rng.shuffle(wear)
    optional = []
    if rng.random() < 0.5:
        optional.append(("wear", rng.choice([f"{a['shoe_color']} shoes", f"{a['shoe_color']} sneakers",
                                             f"a pair of {a['shoe_color']} shoes"])))
    hair = _hair(a, rng) if rng.random() < 0.5 else None
    if a["hat"] and rng.random() < 0.7:
        optional.append(("wear", rng.choice([f"{_an(a['hat'])} hat", f"{_an(a['hat'])} cap"])))
    if a["glasses"] and rng.random() < 0.6:
        optional.append(("wear", rng.choice(["glasses", "a pair of glasses"])))
    if a["backpack"] and rng.random() < 0.8:
        optional.append(("carry", rng.choice([f"{_an(a['backpack'])} backpack",
                                              f"{_an(a['backpack'])} bag on {his} back"])))
    if a["handbag"] and rng.random() < 0.75:
        optional.append(("carry", rng.choice([f"{_an(a['handbag'])} handbag", f"{_an(a['handbag'])} shoulder bag"])))
    rng.shuffle(optional)
    budget = rng.randint(3, 6) - len(wear) - (hair is not None)
    for kind, text in optional[:max(0, budget)]:
        (wear if kind == "wear" else carry).append(text)
    if len(wear) + len(carry) + (hair is not None) < 3 and hair is None:
        hair = _hair(a, rng)

    noun = "woman" if female else "man"
    adj = {"slim": "slim ", "heavy": "heavy-set "}.get(a["build"], "") if rng.random() < 0.15 else ""
    subj = rng.choice([f"A {adj}{noun}", f"A young {adj}{noun}", f"The {adj}{noun}",
                       f"A {adj}{'female' if female else 'male'} pedestrian", "A person", "This pedestrian"])
    He = he.capitalize()
    clothes = _join(wear, rng)
    form = rng.randrange(4)
    if form == 0:
        s = f"{subj} {rng.choice(['wearing', 'in', 'dressed in'])} {clothes}"
        s += f" with {hair}." if hair else "."
        if carry:
            s += f" {He} {rng.choice(['carries', 'is carrying', 'has'])} {_join(carry, rng)}."
    elif form == 1:
        s = f"{subj}{' with ' + hair if hair else ''} {rng.choice(['is wearing', 'wears', 'has on'])} {clothes}"
        s += f" and is carrying {_join(carry, rng)}." if carry else "."
    elif form == 2:
        s = f"The {noun} is wearing {clothes}."
        if hair:
            s += f" {He} has {hair}."
        if carry:
            s += f" {He} carries {_join(carry, rng)}."
    else:  # terse annotator fragment
        frag = clothes[0].upper() + clothes[1:]
        s = f"{frag}{', ' + hair if hair else ''}"
        s += f", carrying {_join(carry, rng)}." if carry else "."
    return s


class SyntheticRenderer:
    """Picklable worker callable: Entry -> (jpeg_bytes, None, captions). Image and captions draw from separate
    seeded streams so changing --captions-per-image does not change the images."""

    def __init__(self, seed: int, height: int, width: int, captions_per_image: int):
        self.seed, self.height, self.width, self.cpi = seed, height, width, captions_per_image

    def __call__(self, entry: Entry):
        key = f"{self.seed}:{entry.orig_id}:{entry.index}"
        rng = random.Random(key + ":image")
        img = render(entry.attributes, rng, self.height, self.width)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=rng.randint(60, 95))
        crng = random.Random(key + ":captions")
        caps = []
        for _ in range(self.cpi):
            c = caption(entry.attributes, crng)
            for _ in range(3):  # two identical captions for one image teach nothing; retry a few times
                if c not in caps:
                    break
                c = caption(entry.attributes, crng)
            caps.append(c)
        return buf.getvalue(), None, tuple(caps)
