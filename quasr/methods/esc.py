"""ESC: activation scales found by an evolution strategy (arXiv 2603.08173; shared/METHODS.md, "ESC").

Audio activations have wide, heavy-tailed ranges, and the standard calibrators (max, percentile, MSE, entropy)
clip them badly. ESC sets every activation scale in two steps:

1. local: per layer, the scale minimizing ‖x Wᵀ − Q(x) Wᵀ‖² over sampled inputs (quasr.quant.activations,
   "output-mse"; the conv stem, which has no Linear weight, takes the input's own MSE scale);
2. global: CMA-ES (the `cmaes` package) over log-scale offsets z of all scales at once, s_l = s_l^local·exp(z_l),
   z₀ = 0, σ₀ = 0.1, population 4 + ⌊3 ln n⌋; fitness = the quantized model's teacher-forced token
   cross-entropy on a held-in subset of the calibration set (`fitness="wer"`: its WER with greedy decoding).
   The final search mean is used (not the best sample: the mean is the less noisy estimate).

The search state (the CMA-ES object, evaluations, history) is saved after every generation next to the output
(`state` path); a killed search resumes from it, and a state of another model or recipe is refused.
"""
from __future__ import annotations

import hashlib
import json
import math
import pickle
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from quasr.quant.grid import QuantConfigError


@dataclass
class EscOptions:
    budget: int = 100          # fitness evaluations of the search (the final mean is evaluated once more)
    population: int | None = None  # None: 4 + floor(3 ln n)
    subset: int = 16           # held-in calibration utterances the fitness is computed on
    sigma: float = 0.1
    seed: int = 0
    fitness: str = "ce"        # ce | wer
    state: str | None = None   # where the search state is saved (None: not saved)

    @classmethod
    def from_dict(cls, d: dict) -> "EscOptions":
        known = set(cls.__dataclass_fields__)
        bad = set(d) - known
        if bad:
            raise QuantConfigError(f"ESC has no setting {sorted(bad)[0]!r} (it has {', '.join(sorted(known))})",
                                   option="esc")
        return cls(**d)

    def check(self) -> None:
        if not isinstance(self.budget, int) or self.budget <= 0:
            raise QuantConfigError(f"the ESC budget must be a positive number of evaluations, got {self.budget}",
                                   option="esc_budget")
        if self.population is not None and (not isinstance(self.population, int) or self.population < 2):
            raise QuantConfigError(f"the ESC population must be at least 2, got {self.population}",
                                   option="esc_population")
        if not isinstance(self.subset, int) or self.subset < 1:
            raise QuantConfigError(f"the ESC subset must be a positive number of utterances, got {self.subset}",
                                   option="esc_subset")
        if not self.sigma > 0:
            raise QuantConfigError(f"sigma must be positive, got {self.sigma}", option="esc_sigma")
        if self.fitness not in ("ce", "wer"):
            raise QuantConfigError(f"the ESC fitness is ce or wer, got {self.fitness!r}", option="esc_fitness")


def _fingerprint(asr, names: list[str], base: dict[str, float], cfg, opts: EscOptions, held=()) -> str:
    """What a saved search belongs to: the quantized weights, the layers, the starting scales and the recipe (not
    the budget: a resumed search may be given more evaluations)."""
    h = hashlib.sha256()
    for n, m in sorted(asr.model.named_modules()):
        if hasattr(m, "weight_packed"):
            h.update(n.encode())
            h.update(m.weight_packed[:4].numpy().tobytes())
            h.update(m.weight_packed[-4:].numpy().tobytes())
    # the starting scales to 6 significant digits: the same recipe on another thread count may move their last bits
    h.update(json.dumps([names, [float(f"{base[n]:.6g}") for n in names], [u.id for u in held], cfg.act_bits,
                         cfg.method, cfg.bits,
                         cfg.group_size, {k: v for k, v in asdict(opts).items() if k not in ("state", "budget")}]).encode())
    return h.hexdigest()


def _fitness_fn(asr, modules: dict, names: list[str], base: np.ndarray, utts, opts: EscOptions, bits: int):
    from quasr.quantize import apply_scales

    batches = [asr.training_batch(utts[i:i + 4]) for i in range(0, len(utts), 4)]

    def fitness(z: np.ndarray) -> float:
        apply_scales(modules, dict(zip(names, (base * np.exp(z)).tolist())), bits)
        if opts.fitness == "wer":
            from quasr.decoding import parse_decoding
            from quasr.metrics import score

            hyps = asr.transcribe([u.audio for u in utts], decoding=parse_decoding("greedy"), progress=False)
            return float(score([u.text for u in utts], hyps).wer or 0.0)
        total = n = 0.0
        with torch.inference_mode():
            for b in batches:
                out = asr.model(**b)
                k = int((b["labels"] != -100).sum())
                total += float(out.loss) * k
                n += k
        return total / max(n, 1)

    return fitness


def search(asr, modules: dict, local: dict[str, float], calib, opts: EscOptions, cfg, progress: bool = True) -> dict:
    """CMA-ES over the log-offsets of every activation scale (see the module docstring); applies the final
    search mean and returns what the search did."""
    from cmaes import CMA

    from quasr.progress import progress_bar
    from quasr.quantize import apply_scales

    names = sorted(local)
    base = np.array([local[n] for n in names], dtype=np.float64)
    held = sorted(random.Random(opts.seed).sample(list(calib), min(opts.subset, len(calib))), key=lambda u: u.id)
    fitness = _fitness_fn(asr, modules, names, base, held, opts, cfg.act_bits)
    dim = len(names)
    pop = opts.population or 4 + int(3 * math.log(dim))
    if opts.budget < 1 + pop:
        raise QuantConfigError(f"an ESC budget of {opts.budget} evaluations does not fit one generation: the start "
                               f"and a population of {pop} ({dim} scales) need at least {1 + pop}", option="esc_budget")
    fp = _fingerprint(asr, names, local, cfg, opts, held)
    state_path = Path(opts.state) if opts.state else None
    t0 = time.perf_counter()
    if state_path is not None and state_path.exists():
        with open(state_path, "rb") as fh:
            st = pickle.load(fh)
        if st.get("fingerprint") != fp:
            raise QuantConfigError(f"{state_path}: a saved ESC search of another model or recipe; remove it or give "
                                   f"another --esc-state", option="esc_state")
        es, evals, history, best = st["es"], st["evals"], st["history"], st["best"]
        es._rng.set_state(st["rng"])  # cmaes does not pickle its generator (it reseeds it at random on load)
        before, resumed = st.get("seconds"), evals  # seconds the earlier runs spent (None: a state from before
        # quasr kept them)
    else:
        es = CMA(mean=np.zeros(dim), sigma=opts.sigma, population_size=pop, seed=opts.seed)
        f0 = fitness(np.zeros(dim))
        evals, history, best = 1, [{"generation": 0, "mean_fitness": f0, "best": f0}], f0
        before, resumed = 0.0, None
    with progress_bar(progress) as bar:
        task = bar.add_task(f"ESC (best {best:.4f})", total=opts.budget, completed=min(evals, opts.budget))
        while evals + pop <= opts.budget:
            sols = []
            for _ in range(es.population_size):
                z = es.ask()
                f = fitness(z)
                sols.append((z, f))
                best = min(best, f)
            evals += len(sols)
            es.tell(sols)
            history.append({"generation": len(history), "mean_fitness": float(np.mean([f for _, f in sols])),
                            "best": best})
            bar.update(task, completed=min(evals, opts.budget), description=f"ESC (best {best:.4f})")
            if state_path is not None:
                tmp = state_path.with_name(state_path.name + ".tmp")
                with open(tmp, "wb") as fh:
                    pickle.dump({"fingerprint": fp, "es": es, "rng": es._rng.get_state(), "evals": evals,
                                 "history": history, "best": best,
                                 "seconds": None if before is None else before + time.perf_counter() - t0}, fh)
                tmp.replace(state_path)
    mean = np.asarray(es.mean, dtype=np.float64)
    final = fitness(mean)
    scales = dict(zip(names, (base * np.exp(mean)).tolist()))
    apply_scales(modules, scales, cfg.act_bits)
    return {"evaluations": evals + 1, "population": es.population_size, "dims": dim, "fitness": opts.fitness,
            "start_fitness": history[0]["mean_fitness"], "final_fitness": final, "best_sample": best,
            "generations": len(history) - 1, "seconds_this_run": round(time.perf_counter() - t0, 1),
            # the whole search's time over every run that made it (None: an earlier run's time was not kept)
            "seconds": None if before is None else round(before + time.perf_counter() - t0, 1),
            "resumed_at_evaluation": resumed,
            "max_abs_offset": float(np.abs(mean).max()), "history": history, "subset_ids": [u.id for u in held]}
