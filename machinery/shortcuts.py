"""Shortcut tests: what a model scores on films without their lungs, or with the lungs alone,
and which sources a data set can hold out of training.

    hidden = Hidden("lungs", 0.75, crop=True)   # --hide lungs --hide-box 0.75 --resize crop
    hidden.apply(a)                             # (..., H, W): the central box black
    sources_to_hold_out(audit["sources"])       # {source: what holding it out would cost}

A model that scores well on the border of the films alone scores on where a film came from,
not on what it shows (Maguolo & Nanni 2020; DeGrave, Janizek & Lee, Nature Machine
Intelligence 2021). films.py applies the box as each film is decoded (--hide), so training,
evaluation, the API and every size see one box; datasets.hold_out_sources makes the split of
--test-sources; ablate.py --preset shortcut runs the whole test (docs/data.md).
"""
from dataclasses import dataclass

import numpy as np

HIDE = ("none", "lungs", "outside")  # --hide: what of each film is blacked out
BOX = (0.1, 0.95)  # --hide-box's range: a box and a border of a few pixels at least
NOT_A_CLASSIFIER = "a shortcut test, not a classifier"


@dataclass(frozen=True)
class Hidden:
    """What --hide blacks out of every film: the central box ('lungs': only a border of
    (1 - box) / 2 of each side is left, the film's edges, markers and shoulders, which in a
    frontal film hold no lung) or all but it ('outside': the lungs alone), or nothing.

    The box is `box` of each side of the square the model sees: the whole film (--resize
    squish) or its centre square (crop: a box of the whole film would leave a tall film no
    top or bottom border there, and its shape would tell each film's aspect)."""
    what: str = "none"
    box: float = 0.75
    crop: bool = False

    def __post_init__(self):
        if self.what not in HIDE or not BOX[0] <= self.box <= BOX[1]:
            raise ValueError(f"hide {self.what!r}, box {self.box!r}: give one of "
                             f"{', '.join(HIDE)} and a box of {BOX[0]} to {BOX[1]} of each side")

    def __bool__(self):  # anything hidden
        return self.what != "none"

    @classmethod
    def of(cls, config):
        """The films a run saw, from its config (config.json's dict; runs made before --hide
        and checkpoints without a resize saw whole, squished films)."""
        return cls(config.get("hide", "none"), config.get("hide_box", cls.box),
                   config.get("resize", "squish") == "crop")

    def apply(self, a):
        """`a` (..., H, W) with the box (or all but it) black: a new array ('none': `a`)."""
        if not self:
            return a
        h, w = a.shape[-2:]
        bh, bw = (self.box * min(h, w),) * 2 if self.crop else (self.box * h, self.box * w)
        top, left = round((h - bh) / 2), round((w - bw) / 2)
        inside = (..., slice(top, h - top), slice(left, w - left))
        out = np.array(a) if self.what == "lungs" else np.zeros_like(a)
        out[inside] = 0 if self.what == "lungs" else a[inside]
        return out

    def note(self):
        """What the model sees of the films, for the log, report.md and the model card."""
        box = f"the central {self.box:.0%} x {self.box:.0%}" + (
            " of each film's centre square" if self.crop else " of each film")
        return {"lungs": f"films with the lungs hidden ({box} blacked out, only its border seen)",
                "outside": f"films with the lungs alone (all but {box} blacked out)"}[self.what]


WHOLE = Hidden()  # the films as they are


def sources_to_hold_out(sources):
    """{source: (classes that would have no training film left, classes its test would lack)}
    for each source of audit.source_table's counts held out alone (train.py --test-sources):
    the first must be empty for the test to be made; the second asks for
    --allow-missing-class."""
    out = {}
    for s, row in sources.items():
        lost = [c for c, n in row.items()
                if n and not any(r[c] for t, r in sources.items() if t != s)]
        out[s] = (lost, [c for c, n in row.items() if not n])
    return out
