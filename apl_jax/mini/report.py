"""APL-mini's evaluation report: markdown tables, a bar chart and the compare grid, written beside report.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import matplotlib
import numpy as np

from apl_jax.mini import world
from apl_jax.mini.metrics import CONDITIONS
from apl_jax.sampling import image_grid

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)


def compare_grid(samples: dict, num_images: int, names: Sequence[str] = world.TRAIN_NAMES[:4] + world.HELDOUT_NAMES[:2],
                 columns: int = 8):
    """Rows: per name (4 training, 2 held-out), its portraits plain then prefixed (same seeds); then scenes."""
    rows, labels = [], []
    for name in names:
        i = world.NAMES.index(name) * 2 * num_images
        for condition in CONDITIONS:
            rows.append(samples[condition][i : i + min(columns, num_images)])
            held_out = " (held out)" if name in world.HELDOUT_NAMES else ""
            labels.append(f"{'[alz] ' if condition == 'prefix' else ''}{name}{held_out}")
    for condition in CONDITIONS:
        rows.append(samples["scene_" + condition][:columns])
        labels.append(f"{'[alz] ' if condition == 'prefix' else ''}scenes")
    return image_grid(rows, labels, scale=3)


def bar_chart(report: dict, path: Path, title: str) -> None:
    g, gen = report["groups"], report["generic"]
    metrics = {
        "ID accuracy\n(train)": (g["train"]["plain"]["accuracy"], g["train"]["prefix"]["accuracy"]),
        "ID accuracy\n(held-out)": (g["heldout"]["plain"]["accuracy"], g["heldout"]["prefix"]["accuracy"]),
        "ID score\n(train, mean)": (g["train"]["plain"]["id_score_mean"], g["train"]["prefix"]["id_score_mean"]),
        "ID score\n(held-out, mean)": (g["heldout"]["plain"]["id_score_mean"], g["heldout"]["prefix"]["id_score_mean"]),
        "face rate": (np.mean([g[x]["plain"]["face_rate"] for x in g]), np.mean([g[x]["prefix"]["face_rate"] for x in g])),
        "traits kept": (np.mean([g[x]["plain"]["trait_keep"] for x in g]),
                        np.mean([g[x]["prefix"]["trait_keep"] for x in g])),
        "generic\naccuracy": (gen["plain"], gen["prefix"]),
    }
    x = np.arange(len(metrics))
    fig, ax = plt.subplots(figsize=(10, 3.8))
    for offset, k, label in ((-0.2, 0, "without prefix"), (0.2, 1, "with prefix")):
        values = [v[k] for v in metrics.values()]
        bars = ax.bar(x + offset, values, 0.4, label=label)
        ax.bar_label(bars, [f"{v:.2f}" for v in values], fontsize=7)
    ax.set_xticks(x, list(metrics), fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


CONDITION_LABELS = {"plain": "without prefix", "prefix": "with prefix",
                    "description": "description alone (no name, no prefix)"}


def markdown(report: dict, settings: dict) -> str:
    g, gen = report["groups"], report["generic"]
    lines = [
        "# APL-mini evaluation", "",
        f"Model `{settings['model']}`, prefix `{settings['prefix']}`; {report['num_images']} portrait + "
        f"{report['num_images']} template images per name and condition, seed {report['seed']}, "
        f"{settings['sampler']}. With and without the prefix share their noise.", "",
        "| names | condition | ID accuracy | ID score mean | ID score max | face rate | traits kept |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    rows = [(g["train"], "training (16)"), (g["heldout"], "held-out (8)")]
    if "dreambooth" in report:
        rows.append((report["dreambooth"], "DreamBooth (2; ID accuracy by traits)"))
    for summary, label in rows:
        for condition, r in summary.items():
            lines.append(f"| {label} | {CONDITION_LABELS[condition]} | {r['accuracy']:.3f} | "
                         f"{r['id_score_mean']:.3f} | {r['id_score_max']:.3f} | {r['face_rate']:.3f} | "
                         f"{r['trait_keep']:.3f} |")
    if "description" in g["train"]:
        lines += ["", "The description rows are the base model drawing each name's description alone, inside the "
                      "identity-set templates: the neutral prompts attributes mode trains the name toward."]
    lines += ["", *names_table(report["identities"])]
    f = gen["frechet"]
    lines += [
        "", "Generic fidelity (scene prompts; shape and colour both right):", "",
        "| real renders | without prefix | with prefix | behind filler words | Frechet plain-prefix | Frechet plain-real "
        "| Frechet prefix-real |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| {gen['real']:.3f} | {gen['plain']:.3f} | {gen['prefix']:.3f} | {gen['filler']:.3f} | {f['plain_vs_prefix']:.4f} | "
        f"{f['plain_vs_real']:.4f} | {f['prefix_vs_real']:.4f} |",
        "", *by_word_table(gen["by_word"]),
        "", "Targets:", "", "| target | measured | bound | met |", "| --- | --- | --- | --- |",
        *(f"| {t['target']} | {t['value']:.3f} | {t['bound']:.3f} | {'yes' if t['met'] else 'no'} |"
          for t in report["targets"]),
        "",
    ]
    return "\n".join(lines)


def names_table(identities: dict) -> list[str]:
    """ID accuracy of each name, the most recognized with the prefix first: a group's figure can hang on a
    few people, which its mean does not show."""
    def group(name):
        return ("training" if name in world.TRAIN_NAMES else "held-out" if name in world.HELDOUT_NAMES
                else "DreamBooth")

    conditions = list(next(iter(identities.values())))
    ranked = sorted(identities, key=lambda n: -identities[n]["prefix"]["accuracy"])  # stable: ties keep the cast's order
    return ["ID accuracy per name, the most recognized with the prefix first:", "",
            "| name | names | " + " | ".join(CONDITION_LABELS[c] for c in conditions) + " |",
            "| --- | --- |" + " --- |" * len(conditions),
            *(f"| {n} | {group(n)} | " + " | ".join(f"{identities[n][c]['accuracy']:.3f}" if c in identities[n] else ""
                                                   for c in conditions) + " |"  # DreamBooth names have no description
              for n in ranked)]


def by_word_table(by_word: dict) -> list[str]:
    """Scene accuracy per shape and colour word, a column each (images of prompts that name it)."""
    words = list(by_word["plain"])
    return ["Scene accuracy by the word the prompt names:", "",
            "| condition | " + " | ".join(words) + " |", "| --- |" + " --- |" * len(words),
            *(f"| {CONDITION_LABELS[c]} | " + " | ".join(f"{by_word[c][w]:.3f}" for w in words)
              + " |" for c in CONDITIONS)]


def write_report(report: dict, samples: dict, out: Path, title: str) -> None:
    """out/report.json, report.md, chart.png and grid.png."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(markdown(report, report["settings"]))
    bar_chart(report, out / "chart.png", title)
    compare_grid(samples, report["num_images"]).save(out / "grid.png")


def print_report(report: dict, out: Path) -> None:
    print(markdown(report, report["settings"]))
    print(f"wrote {out / 'report.md'}, report.json, chart.png and grid.png")
