"""Shortcut tests: what a model scores on films without their lungs, or with the lungs alone,
and which sources a data set can hold out of training.

    hide(a, "lungs", 0.75)                      # (..., H, W): the central 75% x 75% black
    sources_to_hold_out(audit["sources"])       # {source: classes that would lose training}

A model that scores well on the border of the films alone scores on where a film came from,
not on what it shows (Maguolo & Nanni 2020; DeGrave, Janizek & Lee, Nature Machine
Intelligence 2021). films.py applies hide() as each film is decoded (--hide), so training,
evaluation, the API and every size see one box; datasets.hold_out_sources makes the split of
--test-sources; ablate.py --preset shortcut runs the whole test (docs/data.md).
"""
import numpy as np

HIDE = ("none", "lungs", "outside")  # --hide: what of each film is blacked out


def hide(a, what, box):
    """A shortcut test's film (--hide): `a` (..., H, W) with its central box, `box` of each
    side, blacked out ('lungs': only a border of (1 - box) / 2 of each side is left, which
    holds the film's edges, markers and shoulders but in a frontal film not the lungs) or all
    but that box ('outside': the lungs alone). 'none': `a` itself; a new array otherwise."""
    if what == "none":
        return a
    h, w = a.shape[-2:]
    top, left = round(h * (1 - box) / 2), round(w * (1 - box) / 2)
    inside = (..., slice(top, h - top), slice(left, w - left))
    out = np.array(a) if what == "lungs" else np.zeros_like(a)
    out[inside] = 0 if what == "lungs" else a[inside]
    return out


def shortcut_note(what, box):
    """What --hide shows of the films, said in the log, report.md and the model card."""
    seen = {"lungs": f"the lungs hidden (the central {box:.0%} x {box:.0%} of each film "
                     "blacked out, only its border seen)",
            "outside": f"the lungs alone (all but the central {box:.0%} x {box:.0%} of each "
                       "film blacked out)"}[what]
    return f"films with {seen}"


def sources_to_hold_out(sources):
    """{source: the classes that would have no training film left} for each source of
    source_table's counts, held out alone (train.py --test-sources): [] where every class
    keeps some, so that the held-out test can be made."""
    out = {}
    for s, row in sources.items():
        out[s] = [c for c, n in row.items()
                  if n and not any(r[c] for t, r in sources.items() if t != s)]
    return out
