"""`gsmkit steer ...`: activation steering: vectors (contrast pairs, few-shot prompts), a tuned search."""

from __future__ import annotations

import json

import typer

from gsmkit.cli.options import JsonOpt, command_from
from gsmkit.steer.vectors import VectorSettings

app = typer.Typer(help="Activation steering: CAA and DAC vectors, an Optuna search of layer and strength.",
                  no_args_is_help=True)


@app.command("vectors")
@command_from(VectorSettings)
def vectors(settings: VectorSettings, json_out: JsonOpt = False) -> None:
    """Steering vectors per decoder layer: CAA from contrast pairs, DAC from k-shot against zero-shot prompts.

    CAA: the mean over pairs of h(positive) - h(negative), h being a decoder layer's output averaged over
    the completion; positives are gold solutions (or the correct traces of --pairs-from), negatives
    corrupted or sampled wrong solutions. DAC: per generation step t < --steps, the mean difference of the
    attention output projection's input between the k-shot and the zero-shot prompt of each problem.

    Writes OUT/vectors.safetensors, OUT/steer.json and OUT/manifest.json. Activations are cached
    (--cache-dir): a second run with the same settings reads them and loads no model.

    Example: gsmkit steer vectors --model HuggingFaceTB/SmolLM2-135M-Instruct --data ../shared/data/gsm8k
    --split train --limit 64 --method caa --layers all --out runs/steer-caa
    """
    from gsmkit.progress import ProgressTask, stderr_console
    from gsmkit.steer.vectors import make_vectors

    console = stderr_console()
    with ProgressTask("steer vectors", "problems", console) as bar:
        result = make_vectors(settings, on_start=bar.start, on_progress=bar.advance)
    if json_out:
        from gsmkit.manifest import to_jsonable

        typer.echo(json.dumps(to_jsonable(result.summary())))
        return
    m = result.meta
    cache = m.cache
    where = f" in {cache['dir']}" if cache.get("dir") else " (--no-cache)"
    norms = {int(k): v if isinstance(v, float) else max(v) for k, v in m.norms.items()}
    top = max(norms, key=norms.get)
    what = (f"{m.negatives} negatives, position {m.position}" if m.method == "caa"
            else f"{m.k}-shot against zero-shot, {m.steps} steps")
    console.print(f"{m.method} vectors for {len(m.layers)} layers from {m.pairs} problems ({what}, style "
                  f"{m.style}); largest norm {norms[top]:.3g} at layer {top}", highlight=False)
    console.print(f"activation cache: {cache['hits']} hits, {cache['misses']} misses{where}; "
                  f"{'model loaded' if result.model_loaded else 'no model loaded'}; {result.wall_s:.1f}s; "
                  f"vectors in {result.out}", highlight=False)

from gsmkit.cli.steer_search import search

app.command("search")(search)
