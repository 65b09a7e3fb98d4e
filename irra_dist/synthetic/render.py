"""The procedurally drawn person: identity attributes, captions that name them, and the drawing.

Each identity is a combination of visible attributes (upper and lower clothing colour and type, shoe colour,
bag type and colour, hat type and colour, hair length and colour). :func:`render_person` draws one image of
it with fresh jitter (canvas size and aspect, position, scale, limb positions, background colour and texture,
lighting, blur, noise); :func:`describe` writes a caption from varied templates and synonyms that names every
visible attribute, so a caption identifies its person only through attributes. Both draw from the generator
they are given and nothing else. :mod:`irra_dist.synthetic.dataset` writes a dataset of such people.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# Saturated, well separated colours: they must stay distinguishable at 128x48 after JPEG and noise.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (205, 25, 30),
    "orange": (245, 135, 15),
    "yellow": (240, 215, 30),
    "green": (30, 150, 50),
    "blue": (25, 65, 205),
    "purple": (125, 35, 160),
    "pink": (245, 125, 185),
    "brown": (120, 70, 25),
    "black": (25, 25, 25),
    "white": (238, 238, 238),
    "grey": (128, 128, 128),
}
HAIR_COLORS: dict[str, tuple[int, int, int]] = {
    "black": (20, 20, 20),
    "brown": (105, 55, 20),
    "blonde": (235, 195, 60),
    "grey": (165, 165, 165),
}
SKIN_TONES = ((245, 210, 180), (215, 170, 130), (165, 115, 80))

# Every colour word maps to exactly one colour, so a caption's colour words can be read back.
COLOR_WORDS: dict[str, tuple[str, ...]] = {
    "red": ("red", "crimson", "scarlet"),
    "orange": ("orange",),
    "yellow": ("yellow", "mustard"),
    "green": ("green", "emerald"),
    "blue": ("blue", "cobalt"),
    "purple": ("purple", "violet"),
    "pink": ("pink",),
    "brown": ("brown", "chocolate"),
    "black": ("black", "jet-black"),
    "white": ("white", "snow-white"),
    "grey": ("grey", "gray"),
    "blonde": ("blonde", "blond"),
}

UPPER_TYPES = ("t-shirt", "jacket", "coat", "tank top")
LOWER_TYPES = ("trousers", "shorts", "skirt")
BAG_TYPES = ("none", "backpack", "handbag", "shoulder bag")
HAT_TYPES = ("none", "cap", "hat")
HAIR_LENGTHS = ("short", "long")
SHOE_COLORS = ("black", "white", "brown", "grey", "red", "blue")
HAT_COLORS = ("black", "white", "red", "blue", "green", "yellow", "grey", "brown")

ITEM_WORDS: dict[str, tuple[str, ...]] = {
    "t-shirt": ("t-shirt", "tee", "short-sleeved shirt"),
    "jacket": ("jacket", "zip-up jacket"),
    "coat": ("coat", "long coat", "overcoat"),
    "tank top": ("tank top", "sleeveless top", "vest"),
    "trousers": ("trousers", "pants", "slacks"),
    "shorts": ("shorts",),
    "skirt": ("skirt",),
    "shoes": ("shoes", "sneakers"),
    "backpack": ("backpack", "rucksack"),
    "handbag": ("handbag", "purse"),
    "shoulder bag": ("shoulder bag", "messenger bag", "satchel"),
    "cap": ("cap", "baseball cap"),
    "hat": ("hat", "sun hat"),
}
_PLURAL_ITEMS = {"trousers", "shorts", "shoes"}

@dataclass(frozen=True)
class PersonAttributes:
    """The visible attributes of one identity; captions name all of them except the skin tone."""

    upper_color: str
    upper_type: str
    lower_color: str
    lower_type: str
    shoes_color: str
    bag_type: str
    bag_color: str
    """"" when bag_type is "none"."""
    hat_type: str
    hat_color: str
    """"" when hat_type is "none"."""
    hair_length: str
    hair_color: str
    skin_tone: int
    """Index into SKIN_TONES; a nuisance factor that captions do not name."""

    @property
    def key(self) -> tuple[str, ...]:
        """The attributes a caption names; unique per identity."""
        return (self.upper_color, self.upper_type, self.lower_color, self.lower_type, self.shoes_color,
                self.bag_type, self.bag_color, self.hat_type, self.hat_color, self.hair_length,
                self.hair_color)

    @property
    def is_woman(self) -> bool:
        """Gender words follow visible cues only (long hair or a skirt), so they carry no hidden identity."""
        return self.hair_length == "long" or self.lower_type == "skirt"


def sample_attributes(rng: random.Random) -> PersonAttributes:
    """Draw one identity's attributes uniformly over the attribute space.

    Args:
        rng: the generator to draw from.
    """
    colors = tuple(COLORS)
    bag_type = rng.choice(BAG_TYPES)
    hat_type = rng.choice(HAT_TYPES)
    return PersonAttributes(
        upper_color=rng.choice(colors), upper_type=rng.choice(UPPER_TYPES),
        lower_color=rng.choice(colors), lower_type=rng.choice(LOWER_TYPES),
        shoes_color=rng.choice(SHOE_COLORS),
        bag_type=bag_type, bag_color="" if bag_type == "none" else rng.choice(colors),
        hat_type=hat_type, hat_color="" if hat_type == "none" else rng.choice(HAT_COLORS),
        hair_length=rng.choice(HAIR_LENGTHS), hair_color=rng.choice(tuple(HAIR_COLORS)),
        skin_tone=rng.randrange(len(SKIN_TONES)))


# --------------------------------------------------------------------------------------------------
# Captions


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _item(rng: random.Random, color: str, item: str) -> str:
    """``"<colour word> <item word>"``, with an article for singular items; colour always comes first."""
    phrase = f"{rng.choice(COLOR_WORDS[color])} {rng.choice(ITEM_WORDS[item])}"
    return phrase if item in _PLURAL_ITEMS else _article(phrase)


def describe(attrs: PersonAttributes, rng: random.Random) -> str:
    """Write one caption naming every visible attribute, from a randomly chosen template.

    Each attribute appears as a colour word directly followed by its item word(s) ("a crimson coat",
    "long blonde hair"); an absent bag or hat is either left out or stated without a colour.

    Args:
        attrs: the person to describe.
        rng: the generator choosing templates and synonyms.
    """
    woman = attrs.is_woman
    noun = rng.choice(("woman", "lady", "girl", "person", "pedestrian") if woman
                      else ("man", "guy", "gentleman", "person", "pedestrian"))
    pron, poss = ("she", "her") if woman else ("he", "his")
    upper = _item(rng, attrs.upper_color, attrs.upper_type)
    lower = _item(rng, attrs.lower_color, attrs.lower_type)
    shoes = _item(rng, attrs.shoes_color, "shoes")
    hair = f"{attrs.hair_length} {rng.choice(COLOR_WORDS[attrs.hair_color])} hair"

    opening = rng.choice((
        f"{_article(noun)} wearing {upper} and {lower}",
        f"the {noun} is wearing {upper} with {lower}",
        f"the {noun} has on {upper} and {lower}",
        f"this {noun} is dressed in {upper} over {lower}",
        f"{_article(noun)} in {upper}, {lower} and {shoes}",
        f"{_article(noun)} with {hair}, wearing {upper} and {lower}",
    ))
    clauses = []
    if shoes not in opening:
        clauses.append(rng.choice((f"{pron} wears {shoes}", f"{pron} has {shoes} on {poss} feet",
                                   f"{pron} is wearing {shoes}")))
    if hair not in opening:
        clauses.append(rng.choice((f"{pron} has {hair}", f"{poss} {hair} is visible",
                                   f"{pron} has {hair} on {poss} head")))
    if attrs.bag_type != "none":
        bag = _item(rng, attrs.bag_color, attrs.bag_type)
        specific = {"backpack": f"{pron} has {bag} on {poss} back",
                    "handbag": f"{pron} holds {bag} in one hand",
                    "shoulder bag": f"{bag} hangs from {poss} shoulder"}[attrs.bag_type]
        clauses.append(rng.choice((f"{pron} is carrying {bag}", f"{pron} carries {bag}", specific)))
    elif rng.random() < 0.5:
        clauses.append(rng.choice((f"{pron} is not carrying anything", f"{pron} carries no bag")))
    if attrs.hat_type != "none":
        hat = _item(rng, attrs.hat_color, attrs.hat_type)
        clauses.append(rng.choice((f"{pron} wears {hat}", f"{pron} has {hat} on {poss} head",
                                   f"{hat} covers {poss} head")))
    elif rng.random() < 0.3:
        clauses.append(rng.choice((f"{pron} wears nothing on {poss} head", f"{pron} is bareheaded")))
    rng.shuffle(clauses)

    sentences = [opening]
    while clauses:
        # Join one or two clauses per sentence for variety in length and rhythm.
        take = 2 if len(clauses) > 1 and rng.random() < 0.4 else 1
        sentences.append(" and ".join(clauses[:take]))
        del clauses[:take]
    return " ".join(s[0].upper() + s[1:] + "." for s in sentences)


# --------------------------------------------------------------------------------------------------
# Drawing

Box = tuple[int, int, int, int]
_HALF_EXTENT = 0.2  # the widest drawn part (handbag, backpack) from the centre line, in person heights


def _shade(color: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    return tuple(min(255, max(0, round(c * factor))) for c in color)  # type: ignore[return-value]


def _jitter_color(rng: random.Random, color: tuple[int, int, int], amount: int) -> tuple[int, int, int]:
    return tuple(min(255, max(0, c + rng.randint(-amount, amount))) for c in color)  # type: ignore[return-value]


@functools.lru_cache(maxsize=2)
def _noise_bank(seed: int) -> np.ndarray:
    """Unit Gaussian noise larger than any image; each image adds a crop at a random offset (cheap)."""
    return np.random.default_rng([seed, 0x5EED]).standard_normal((512, 256, 3), dtype=np.float32)


def _draw_background(draw: ImageDraw.ImageDraw, rng: random.Random, width: int, height: int) -> None:
    # Muted, low-saturation colours so that the clothing stays the salient colour in the crop.
    grey = rng.randint(60, 200)
    base = tuple(min(255, max(0, grey + rng.randint(-22, 22))) for _ in range(3))
    draw.rectangle((0, 0, width, height), fill=base)
    texture = rng.randrange(4)
    if texture == 1:  # ground plane
        top = rng.randint(height // 2, height * 7 // 8)
        draw.rectangle((0, top, width, height), fill=_shade(base, rng.uniform(0.7, 1.25)))
    elif texture == 2:  # blocks of scenery (walls, doors, cars)
        for _ in range(rng.randint(2, 5)):
            x0, y0 = rng.randint(-width // 2, width), rng.randint(-height // 4, height)
            x1, y1 = x0 + rng.randint(width // 6, width), y0 + rng.randint(height // 8, height // 2)
            draw.rectangle((x0, y0, x1, y1), fill=_shade(base, rng.uniform(0.6, 1.35)))
    elif texture == 3:  # tiles or railings
        step = rng.randint(6, 30)
        stripe = _shade(base, rng.uniform(0.75, 1.2))
        for y in range(rng.randrange(step), height, step):
            draw.line((0, y, width, y), fill=stripe, width=max(1, step // 6))


def _draw_person(draw: ImageDraw.ImageDraw, attrs: PersonAttributes, rng: random.Random, cx: float,
                 top: float, h: float) -> dict[str, Box]:
    """Draw a frontal person whose head top is at ``top`` and whose height is ``h`` pixels.

    Returns the boxes (x0, y0, x1, y1) of unoccluded regions of each coloured part, for tests.
    """
    side = rng.choice((-1, 1))  # which side the bag and the cap's brim are on

    def pt(fx: float, fy: float) -> tuple[float, float]:
        return cx + fx * h, top + fy * h

    def rect(fx0: float, fy0: float, fx1: float, fy1: float) -> tuple[float, float, float, float]:
        (x0, y0), (x1, y1) = pt(fx0, fy0), pt(fx1, fy1)
        return min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)

    def box(fx: float, fy: float, half_w: float, half_h: float) -> Box:
        x0, y0, x1, y1 = rect(fx - half_w, fy - half_h, fx + half_w, fy + half_h)
        return round(x0), round(y0), round(x1), round(y1)

    def width(f: float) -> int:
        return max(1, round(f * h))

    skin = _jitter_color(rng, SKIN_TONES[attrs.skin_tone], 8)
    upper = _jitter_color(rng, COLORS[attrs.upper_color], 6)
    lower = _jitter_color(rng, COLORS[attrs.lower_color], 6)
    shoes = _jitter_color(rng, COLORS[attrs.shoes_color], 6)
    hair = _jitter_color(rng, HAIR_COLORS[attrs.hair_color], 8)
    bag = _jitter_color(rng, COLORS[attrs.bag_color], 6) if attrs.bag_color else skin
    hat = _jitter_color(rng, COLORS[attrs.hat_color], 6) if attrs.hat_color else skin
    lean = rng.uniform(-0.015, 0.015)  # head and shoulders shift against the hips
    spread = rng.uniform(0.0, 0.045)
    swing = (rng.uniform(0.0, 0.035), rng.uniform(0.0, 0.035))
    boxes: dict[str, Box] = {}

    if attrs.bag_type == "backpack":  # its bulk shows beside the torso, behind the arm
        draw.rectangle(rect(side * 0.09 + lean, 0.15, side * 0.2 + lean, 0.47), fill=bag)

    # Legs: hip, knee and ankle per side; trousers cover them, shorts and skirts leave them bare.
    legs = []
    for s in (-1, 1):
        hip, knee = pt(s * 0.045, 0.52), pt(s * (0.045 + spread / 2), 0.71)
        ankle = pt(s * (0.045 + spread), 0.91)
        legs.append((hip, knee, ankle))
        leg_color = lower if attrs.lower_type == "trousers" else skin
        draw.line((hip, knee, ankle), fill=leg_color, width=width(0.075), joint="curve")
        if attrs.lower_type == "shorts":
            end = (hip[0] + 0.84 * (knee[0] - hip[0]), hip[1] + 0.84 * (knee[1] - hip[1]))
            draw.line((hip, end), fill=lower, width=width(0.08))
    if attrs.lower_type == "skirt":
        draw.polygon([pt(-0.09, 0.45), pt(0.09, 0.45), pt(0.15, 0.72), pt(-0.15, 0.72)], fill=lower)
        boxes["lower"] = box(0.0, 0.66, 0.03, 0.03)
    else:
        draw.polygon([pt(-0.09, 0.45), pt(0.09, 0.45), pt(0.095, 0.55), pt(-0.095, 0.55)], fill=lower)
        (hip, knee, ankle) = legs[0]
        # Trousers: halfway down the shin; shorts: low on the thigh, below a coat's hem.
        a, b, t = (knee, ankle, 0.5) if attrs.lower_type == "trousers" else (hip, knee, 0.72)
        x, y = a[0] + t * (b[0] - a[0]), a[1] + t * (b[1] - a[1])
        boxes["lower"] = box((x - cx) / h, (y - top) / h, 0.015, 0.02)

    for s, (_, _, ankle) in zip((-1, 1), legs):
        fx = (ankle[0] - cx) / h + s * 0.01
        draw.ellipse(rect(fx - 0.047, 0.905, fx + 0.047, 0.97), fill=shoes)
        boxes.setdefault("shoes", box(fx, 0.937, 0.02, 0.01))

    draw.rectangle(rect(lean - 0.025, 0.12, lean + 0.025, 0.18), fill=skin)  # neck
    shoulder_y, half = 0.165, 0.105
    if attrs.upper_type == "tank top":
        draw.polygon([pt(lean - half, shoulder_y), pt(lean + half, shoulder_y), pt(lean + half, 0.2),
                      pt(lean - half, 0.2)], fill=skin)
        half = 0.08
    hem = 0.6 if attrs.upper_type == "coat" else 0.46
    hem_half = 0.11 if attrs.upper_type == "coat" else 0.09
    draw.polygon([pt(lean - half, shoulder_y), pt(lean + half, shoulder_y), pt(hem_half, hem),
                  pt(-hem_half, hem)], fill=upper)
    if attrs.upper_type in ("jacket", "coat"):  # a front opening or zip, darker than the cloth
        draw.line((pt(lean, 0.17), pt(0.0, hem)), fill=_shade(upper, 0.75), width=width(0.008))
    boxes["upper"] = box(lean / 2, 0.3, 0.03, 0.06)

    if attrs.hair_length == "long":  # strands falling over the shoulders, beside the neck
        for s in (-1, 1):
            draw.rectangle(rect(lean + s * 0.035, 0.06, lean + s * 0.085, 0.26), fill=hair)

    if attrs.bag_type == "backpack":  # straps over both shoulders
        for s in (-1, 1):
            draw.rectangle(rect(lean + s * 0.04, shoulder_y, lean + s * 0.075, 0.38), fill=bag)
        boxes["bag"] = box(lean + side * 0.0575, 0.27, 0.008, 0.04)

    # Arms: shoulder, elbow, wrist; sleeves by upper type (none, short, long).
    hands = []
    for s, sw in zip((-1, 1), swing):
        shoulder, elbow = pt(lean + s * 0.095, 0.18), pt(s * (0.112 + sw / 2), 0.32)
        wrist = pt(s * (0.12 + sw), 0.46)
        draw.line((shoulder, elbow, wrist), fill=skin, width=width(0.05), joint="curve")
        if attrs.upper_type in ("jacket", "coat"):
            draw.line((shoulder, elbow, wrist), fill=upper, width=width(0.055), joint="curve")
        elif attrs.upper_type == "t-shirt":
            cuff = (shoulder[0] + 0.55 * (elbow[0] - shoulder[0]),
                    shoulder[1] + 0.55 * (elbow[1] - shoulder[1]))
            draw.line((shoulder, cuff), fill=upper, width=width(0.06))
        hand = (wrist[0] + s * 0.002 * h, wrist[1] + 0.015 * h)
        r = 0.022 * h
        draw.ellipse((hand[0] - r, hand[1] - r, hand[0] + r, hand[1] + r), fill=skin)
        hands.append(hand)

    if attrs.bag_type == "handbag":
        hx = (hands[0 if side < 0 else 1][0] - cx) / h
        draw.line((pt(hx - 0.03, 0.505), pt(hx, 0.485), pt(hx + 0.03, 0.505)), fill=_shade(bag, 0.7),
                  width=width(0.01))
        draw.rectangle(rect(hx - 0.04, 0.5, hx + 0.04, 0.585), fill=bag)
        boxes["bag"] = box(hx, 0.5425, 0.02, 0.02)
    elif attrs.bag_type == "shoulder bag":
        draw.line((pt(lean - side * 0.07, 0.17), pt(side * 0.1, 0.4)), fill=bag, width=width(0.02))
        draw.rectangle(rect(side * 0.06, 0.39, side * 0.165, 0.49), fill=bag)
        boxes["bag"] = box(side * 0.1125, 0.44, 0.02, 0.02)

    head = rect(lean - 0.055, 0.01, lean + 0.055, 0.14)
    draw.ellipse(head, fill=skin)
    hair_box = rect(lean - 0.062, 0.003, lean + 0.062, 0.147)
    draw.chord(hair_box, 195, 345, fill=hair)
    if attrs.hair_length == "short":  # sideburns so that short hair still shows under a hat
        for s in (-1, 1):
            draw.rectangle(rect(lean + s * 0.045, 0.04, lean + s * 0.058, 0.085), fill=hair)

    if attrs.hat_type == "cap":
        draw.chord(rect(lean - 0.06, -0.005, lean + 0.06, 0.1), 180, 360, fill=hat)
        draw.rectangle(rect(lean, 0.04, lean + side * 0.11, 0.055), fill=hat)
        boxes["hat"] = box(lean, 0.03, 0.02, 0.01)
    elif attrs.hat_type == "hat":
        draw.rectangle(rect(lean - 0.055, -0.035, lean + 0.055, 0.045), fill=hat)
        draw.ellipse(rect(lean - 0.115, 0.03, lean + 0.115, 0.06), fill=hat)
        boxes["hat"] = box(lean, 0.005, 0.025, 0.015)
    else:
        boxes["hair"] = box(lean, 0.025, 0.02, 0.008)
    return boxes


def render_person(attrs: PersonAttributes, rng: random.Random, noise_seed: int = 0,
                  ) -> tuple[Image.Image, dict[str, Box]]:
    """Draw one image of a person with random canvas, pose, background, lighting, blur and noise.

    Args:
        attrs: the identity's attributes.
        rng: the generator for everything image-specific.
        noise_seed: selects the shared noise bank (the dataset seed).

    Returns:
        The RGB image and, per coloured part ("upper", "lower", "shoes", and "bag", "hat", "hair" when
        present and visible), a box (x0, y0, x1, y1) inside which that part's colour is unoccluded.
    """
    height = rng.randint(150, 400)
    width = min(160, max(60, round(height / rng.uniform(2.0, 2.7))))
    person_h = height * rng.uniform(0.8, 0.92)
    # Leave room above the head for a hat's crown (0.035 of the person's height).
    top = rng.uniform(0.04 * person_h, height - 0.985 * person_h)
    # Keep the figure (bags and hands reach 0.2 of its height from the centre line) inside the crop.
    slack = min(0.04 * person_h, max(0.0, width / 2 - _HALF_EXTENT * person_h))
    cx = width / 2 + rng.uniform(-slack, slack)

    image = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(image)
    _draw_background(draw, rng, width, height)
    boxes = _draw_person(draw, attrs, rng, cx, top, person_h)

    if rng.random() < 0.4:  # a low-resolution camera: lose detail, then upsample
        factor = rng.uniform(0.45, 0.8)
        small_size = (max(8, round(width * factor)), max(16, round(height * factor)))
        small = image.resize(small_size, Image.Resampling.BILINEAR)
        image = small.resize((width, height), Image.Resampling.BILINEAR)

    pixels = np.asarray(image, dtype=np.float32)
    light = np.linspace(rng.uniform(0.88, 1.1), rng.uniform(0.88, 1.1), height, dtype=np.float32)
    pixels *= light[:, None, None]
    bank = _noise_bank(noise_seed)
    oy, ox = rng.randrange(bank.shape[0] - height + 1), rng.randrange(bank.shape[1] - width + 1)
    pixels += bank[oy:oy + height, ox:ox + width] * rng.uniform(1.0, 9.0)
    np.clip(pixels, 0, 255, out=pixels)
    return Image.fromarray(pixels.astype(np.uint8)), boxes

