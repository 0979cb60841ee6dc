"""The model card: what a trained model is, what it was trained and tested on, and what it is
not for, written as MODEL_CARD.md with every finished run (report.write_outputs) and every
export (export.py).

    text = model_card(config, classes, size, metrics, leaks)   # dicts as the run folder holds

After Mitchell et al., "Model Cards for Model Reporting" (FAT* 2019), and Hugging Face's
model cards: intended use, data, metrics with their intervals, limits. A COVID-19 classifier
made from public research data is not a medical device; the card says so first.
"""
import json
import os

from machinery import phantom
from machinery.audit import sources_md
from machinery.config import BOOKKEEPING as KEPT, Config
from machinery.metrics import format_metrics
from machinery.shortcuts import NOT_A_CLASSIFIER, Hidden

# Knobs that say where and how a run was kept, and which data: no deviation from the paper
BOOKKEEPING = KEPT | {"data", "train_split", "test_split", "image_dir", "subtypes", "ranks",
                     "allow_patient_overlap", "allow_missing_class", "allow_duplicates",
                     "phantoms", "phantom_seed"}

PRECISION = {"auto": "auto (bf16 autocast on CUDA, fp32 on the CPU)"}
INTENDED_USE = """\
**For research and teaching only. Not a medical device; not for diagnosis, triage or any
decision about a patient.** It was trained on public research images whose labels, sources and
patients' ages differ by class (see Data): it may have learned where a film came from rather
than what it shows. Its test metrics hold for its test split alone."""
PHANTOM_USE = f"""\
**A demonstration, not a classifier of radiographs. Not a medical device.** It was trained on
{phantom.WHAT}: {phantom.TELLS}. It classifies phantoms alone."""


def deviations(config):
    """{knob: (the paper's default, this run's)} for every knob that changes the training."""
    paper = Config().__dict__
    return {k: (paper[k], v) for k, v in config.items()
            if k in paper and k not in BOOKKEEPING and paper[k] != v}


def model_card(config, classes, size, metrics=None, leaks=None, weights=""):
    """MODEL_CARD.md's text from a run's config.json, classes, input size, test_metrics.json
    and leaks.json (the last two may be None: an export of a bare checkpoint); weights: what
    the weights are when not the run's final model (checkpoint.which_weights)."""
    commit = config.get("git_commit") or "unknown"
    dirty = {True: " with uncommitted changes (dirty)", False: " (clean)"}.get(
        config.get("git_dirty"), "")
    crop = config.get("resize", "squish") == "crop"
    hidden = Hidden.of(config)
    opening = [] if not hidden else [
        f"**Trained on {hidden.note()}: {NOT_A_CLASSIFIER}.** Its test metrics say how much of "
        "a score the films of this data set carry " + ("outside the lungs" if hidden.what ==
                                                      "lungs" else "in the central box alone")
        + ", not how well a model reads a chest film (ablate.py --preset shortcut).", ""]
    if weights:
        opening = [f"**Not the finished model: {weights}.** No test metrics belong to these "
                   "weights; evaluate.py measures them.", "", *opening]
    phantoms = config.get("data") == "phantom"
    lines = [f"# Model card: COVID-ResNet, {config.get('arch', '?')}", "", *opening,
             "## Intended use", "", PHANTOM_USE if phantoms else INTENDED_USE, "",
             "## The model", "",
             f"- Classes, in output order: {', '.join(classes)}.",
             f"- Input: one grayscale film, resized to {size} x {size} px "
             + ("(its shorter side to the size, the centre square: fastai v1's validation "
                "crop)" if crop else "(the whole film squished to the square)")
             + (f", as {hidden.note()} (--hide {hidden.what} --hide-box {hidden.box}: the "
                "API and evaluate.py hide it too)" if hidden else "")
             + ", 8-bit (16-bit films stretched over their used range, floats read as "
             "intensities in [0, 1]), repeated to "
             "3 channels and normalised with ImageNet's mean (0.485, 0.456, 0.406) and standard "
             "deviation (0.229, 0.224, 0.225).",
             f"- Network: torchvision's {config.get('arch', '?')} body, weights "
             f"`{config.get('weights', '?')}` before training, and fastai v1's head.",
             f"- Trained by this code at git commit `{commit[:12]}`{dirty}, torch "
             f"{config.get('torch', '?')}, on {config.get('device', '?')}, precision "
             f"{PRECISION.get(config.get('precision'), config.get('precision', '?'))}"
             + (f": {config['arithmetic']} ran" if config.get("arithmetic") else "") + ".",
             "", "## Recipe", "",
             f"Stages {config.get('stages')} px, epochs head-only {config.get('frozen_epochs')} "
             f"and all layers {config.get('unfrozen_epochs')}, recipe `{config.get('recipe')}` "
             "(FIDELITY.md sets each element against fastai v1's source)."]
    dev = deviations(config)
    lines += ["Knobs set otherwise than the paper's defaults: " + (", ".join(
        f"`{k}` {v!r} (paper {p!r})" for k, (p, v) in sorted(dev.items())) or "none") + "."]
    lines += ["", "## Data", "", (phantom_data(config) if phantoms else
                                  f"Data set `{config.get('data', '?')}`")
              + (f" with subtypes `{config['subtypes']}`" if config.get("subtypes") else "")
              + f"; validation: {config.get('val_frac')} of the training patients."
              + (f" Test split: the films of the sources {config['test_sources']}, held out "
                 "of training (a test on collections the model never saw)."
                 if config.get("test_sources") else "")]
    if leaks:
        lines += ["", *sources_md(leaks["sources"], classes)]
        lines += [""] + [f"- Warning: {w}." for w in leaks["source_warnings"]]
        lines += [f"- Test films with an exact or near duplicate in training: "
                  f"{leaks['test_films_with_duplicate_in_train']}"
                  + (" (trained with --allow-duplicates: the test metrics are inflated)"
                     if leaks["test_films_with_duplicate_in_train"] else "") + "."]
    lines += ["", "## Test metrics", ""]
    if metrics:
        lines += [f"On the test split ({metrics['n']} films), each with its 95% interval:", "",
                  "```", format_metrics(metrics), "```"]
    else:
        lines += ["None with this card: evaluate the model with evaluate.py."]
    lines += ["", "## Limits", ""]
    if phantoms:
        lines += ["- Phantoms, not radiographs (Intended use): no number here says anything of "
                  "chest films."]
    else:
        lines += ["- Chest films of public research collections, not of a clinical population; "
                  "prevalence in the test split is not a clinic's, so PPV and NPV do not carry "
                  "over.",
                  "- Per-source metrics (above, when the split files name sources) show how "
                  "far the model depends on where a film came from."]
    lines += ["- Grad-CAM maps (predict.py --cam) show what raised a score, not where disease "
              "is.", ""]
    return "\n".join(lines)


def phantom_data(config):
    """What a --data phantom run trained and was tested on, in words (the card, report.md)."""
    return (f"{config.get('phantoms', '?')} training films and a test split drawn from seed "
            f"{config.get('phantom_seed', 0)} (`--data phantom`), {phantom.WHAT}: "
            f"{phantom.TELLS}. No duplicate check: each film is drawn from its own seed")


def write_model_card(run_dir, out=None, size=None, weights=""):
    """MODEL_CARD.md from a run folder's files, into `out` (default: the run folder); size and
    weights: those of another checkpoint than model.pt (export.py, checkpoint.which_weights)."""
    def read(name):
        path = os.path.join(run_dir, name)
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            return json.load(f)
    config, metrics = read("config.json"), read("test_metrics.json")
    classes = read("classes.json") or (metrics or {}).get("classes", [])
    if weights:  # the test metrics, if any, are the finished model's
        metrics = None
    size = size or (metrics or {}).get("size") or int(str(config["stages"]).split(",")[-1])
    path = os.path.join(out or run_dir, "MODEL_CARD.md")
    with open(path, "w") as f:
        f.write(model_card(config, classes, size, metrics, read("leaks.json"), weights))
    return path
