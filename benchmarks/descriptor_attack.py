"""What the server learns from CE-LoRA's data descriptor, with and without its Gaussian release.

Each client sends its descriptor once (method.celora.descriptor, default `overall`): its label histogram and
the mean and per-dimension variance of the frozen base model's mean-pooled features of its training data.
Under `descriptor_sigma` > 0 the whole vector is clipped to L2 norm `descriptor_clip` (1) and each number gets
N(0, (sigma · clip)²) (fedlora.methods.similarity.privatize; post-processing renormalises the histogram).
Same set-up as benchmarks/privacy.py (MiniLM, rt-sentiment 3,000 examples, 10 clients, Dirichlet 0.5). The
curious server's three readings, per client, over `--draws` noise draws:

    label histogram   total-variation distance of the released histogram to the client's true one; the
                      no-information baseline is the pooled histogram of all clients (what the server would
                      guess knowing only the task)
    feature mean      cosine of the released mean to the client's true mean feature (cosine: the clip's scale
                      is unknown to the server)
    membership        the AUC (scikit-learn) of ranking every training example of every client by the cosine
                      of its feature to the client's released mean (rescaled to the pooled mean's norm: the clip's
                      scale is unknown) minus the pooled mean: does the descriptor tell
                      the client's own sentences from the others'? 0.5 is chance

    .venv/bin/python benchmarks/descriptor_attack.py              # sigma 0, 0.5, 2; 20 draws
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import privacy  # benchmarks/ is on sys.path when this script runs
import torch
from sklearn.metrics import roc_auc_score

from fedlora.config import build_config
from fedlora.methods.similarity import data_descriptor, pooled_features, privatize
from fedlora.privacy.attack import mean_ci
from fedlora.runtime.simulation import Simulation
from fedlora.seeding import rng
from fedlora.sweep import exit_on_error, markdown, write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sigmas", default="0,0.5,2")
    ap.add_argument("--draws", type=int, default=20, help="noise draws per client and sigma")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="benchmarks/out")
    args = ap.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    cfg = privacy.base(args.quick, "celora", 1, 1)
    cfg["name"], cfg["threads"] = "descriptor-attack", 1
    sim = Simulation(build_config(cfg), None)
    method, opt = sim.method, sim.method.opt
    n = len(sim.client_train)
    feats, classes = [], []
    saved = sim.am.get_state({"C"})
    sim.am.set_state({k: torch.zeros_like(v) for k, v in saved.items()})  # the base model's features, as sent
    for cid in range(n):
        d = sim.client_train[cid]
        feats.append(pooled_features(sim.am.model, d.input_ids, d.attention_mask, sim.cfg.eval.batch_size))
        classes.append(sim.client_classes(cid))
    sim.am.set_state(saved)
    num_labels = method.num_labels
    sent = method.client_descriptor(sim.am, sim.client_train[0], classes[0], 0)  # the release path itself
    mine = data_descriptor(feats[0], classes[0], num_labels, opt.descriptor, all_classes=opt.descriptor_sigma > 0)
    mine = privatize(mine, opt.descriptor_sigma, opt.descriptor_clip, rng("descriptor_noise", sim.cfg.seed, 0))
    assert all(torch.allclose(sent[k], mine[k], atol=1e-5) for k in ("hist", "mean", "var")), "not the sent descriptor"
    every = torch.cat(feats).double()
    owner = np.concatenate([np.full(len(f), c) for c, f in enumerate(feats)])
    pooled_mean = every.mean(0)
    pooled_hist = torch.bincount(torch.cat(classes).long(), minlength=num_labels).double()
    pooled_hist /= pooled_hist.sum()
    rows = []
    for sigma in (float(s) for s in args.sigmas.split(",")):
        tv, cos, auc = [], [], []
        for cid in range(n):
            desc = data_descriptor(feats[cid], classes[cid], num_labels, opt.descriptor, all_classes=sigma > 0)
            true_hist, true_mean = desc["hist"].double(), desc["mean"].double()
            for k in range(args.draws if sigma > 0 else 1):
                out = privatize(desc, sigma, opt.descriptor_clip, rng("descriptor_noise", k, cid))
                tv.append(0.5 * float((out["hist"].double() - true_hist).abs().sum()))
                mu = out["mean"].double()
                cos.append(float(torch.nn.functional.cosine_similarity(mu, true_mean, 0)))
                # the released mean (its scale unknown after the clip: rescaled to the pooled mean's norm), centred
                # on the pooled mean of the task's features (public: the base model and the task are known), scored
                # against every example's centred feature
                direction = mu / max(float(mu.norm()), 1e-12) * float(pooled_mean.norm()) - pooled_mean
                score = (every - pooled_mean) @ direction
                auc.append(float(roc_auc_score(owner == cid, score.numpy())))
        prior_tv = [0.5 * float((pooled_hist - torch.bincount(c.long(), minlength=num_labels).double()
                                 / len(c)).abs().sum()) for c in classes]
        row = {"sigma": sigma, "clients": n, "draws": args.draws if sigma > 0 else 1,
               "numbers_sent": int(sum(v.numel() for k, v in desc.items() if k != "classes"))}
        for key, vals in (("hist_tv", tv), ("mean_cos", cos), ("membership_auc", auc), ("prior_tv", prior_tv)):
            row[key], row[f"{key}_lo"], row[f"{key}_hi"] = mean_ci(vals)
        rows.append(row)
        print(f"  sigma {sigma:g}: hist TV {row['hist_tv']:.3f} (prior {row['prior_tv']:.3f}), mean cos "
              f"{row['mean_cos']:.3f}, membership AUC {row['membership_auc']:.3f}", flush=True)
    name = "descriptor_attack" + ("_quick" if args.quick else "")
    write_json(Path(args.out) / f"{name}.json", {"descriptor": opt.descriptor, "clip": opt.descriptor_clip,
                                                 "wall_s": time.perf_counter() - start, "rows": rows})
    print(markdown(rows, [("sigma", "descriptor_sigma", "g"), ("numbers_sent", "numbers sent", "d"),
                          ("hist_tv", "label-hist TV error", ".3f"), ("hist_tv_lo", "95 % CI lo", ".3f"),
                          ("hist_tv_hi", "hi", ".3f"), ("prior_tv", "TV of the task prior", ".3f"),
                          ("mean_cos", "cos(released, true mean)", ".3f"), ("mean_cos_lo", "lo", ".3f"),
                          ("mean_cos_hi", "hi", ".3f"), ("membership_auc", "membership AUC", ".3f"),
                          ("membership_auc_lo", "lo", ".3f"), ("membership_auc_hi", "hi", ".3f")]))


if __name__ == "__main__":
    exit_on_error(main)
