"""The S1/S2 reference: influences through the damped Gauss-Newton matrix.

``s_j = (G + lambda I)^-1 grad l(z_test_j)`` with ``G = (1/N) sum_n J_n^T H_n J_n``
(``J_n`` the Jacobian of the logits in the parameters, ``H_n = diag(p_n) - p_n
p_n^T`` the Hessian of the cross-entropy in the logits), solved by conjugate
gradients on all test points at once (one ``[K, P]`` product per iteration,
each column stopped at ``||r|| <= rtol ||b||``), CG in float64 and the
products in ``--dtype`` (float64 by default; float32 halves their cost and
bounds the attainable residual near 1e-6). Written here
with ``torch.func`` only, independently of influx, so it checks influx too.
Influences are ``s_j . grad l(z_n)``, influx's sign, ``[N_test, N_train]``.
``result.json`` also records, for each residual level 1e-1, 1e-2, ... that CG
passed, the Pearson correlation of the scores at that iterate with the final
ones: how converged the reference is.

Usage: ``python benchmarks/reference_ggn.py --workload S1 --out DIR
[--rtol 1e-8] [--maxiter 2000] [--max-seconds 1200]``: CG stops at the first
of the three (``result.json`` says which, with the largest relative
residual). ``--spectrum`` only prints a power-iteration estimate of the
largest eigenvalue and a Hutchinson estimate of the mean one.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.func import functional_call, grad, jvp, vjp, vmap

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _measure import write_result
from _scale import load_scale, torch_module

CHUNK = 1000


class Ggn:
    """``V [K, P] -> (G + lam I) V`` over the training set (float64 in and out)."""

    def __init__(self, workload: Any, lam: float, dtype: str = "float64") -> None:
        self.net = torch_module(workload, dtype)
        self.dtype = getattr(torch, dtype)
        self.names = [n for n, _ in self.net.named_parameters()]
        self.shapes = [p.shape for _, p in self.net.named_parameters()]
        self.sizes = [p.numel() for _, p in self.net.named_parameters()]
        self.theta = {n: p.detach() for n, p in self.net.named_parameters()}
        self.x = torch.from_numpy(workload.x_train).to(self.dtype)
        self.y = torch.from_numpy(workload.y_train)
        self.lam = lam
        self.size = sum(self.sizes)

    def unflat(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = torch.split(v, self.sizes)
        return {
            n: p.reshape(s)
            for n, p, s in zip(self.names, parts, self.shapes, strict=True)
        }

    def flat(self, d: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([d[n].reshape(d[n].shape[0], -1) for n in self.names], dim=1)

    def logits(self, theta: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.net, theta, (x,))

    def __call__(self, v64: torch.Tensor) -> torch.Tensor:
        v = v64.to(self.dtype)
        out = torch.zeros_like(v)
        tangents = self.unflat_batch(v)
        for start in range(0, len(self.x), CHUNK):
            x = self.x[start : start + CHUNK]

            def f(theta: dict[str, torch.Tensor], x: torch.Tensor = x) -> torch.Tensor:
                return self.logits(theta, x)

            z, pullback = vjp(f, self.theta)
            p = torch.softmax(z, dim=1)

            def jv(t: dict[str, torch.Tensor], f: Any = f) -> torch.Tensor:
                return jvp(f, (self.theta,), (t,))[1]

            u = vmap(jv)(tangents)  # [K, B, C]
            hu = p * u - p * (p * u).sum(-1, keepdim=True)
            back = vmap(lambda c, pullback=pullback: pullback(c)[0])(hu)
            out += self.flat(back)
        return (out / len(self.x)).double() + self.lam * v64

    def unflat_batch(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = torch.split(v, self.sizes, dim=1)
        return {
            n: p.reshape(v.shape[0], *s)
            for n, p, s in zip(self.names, parts, self.shapes, strict=True)
        }

    def per_sample_grads(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``[B, P]`` gradients of each point's cross-entropy."""

        def loss(theta: dict[str, torch.Tensor], xi: Any, yi: Any) -> torch.Tensor:
            z = self.logits(theta, xi[None])
            return torch.nn.functional.cross_entropy(z, yi[None])

        g = vmap(grad(loss), in_dims=(None, 0, 0))(self.theta, x, y)
        return self.flat(g).double()


def cg(
    op: Ggn, b: torch.Tensor, rtol: float, maxiter: int, max_seconds: float
) -> tuple[Any, dict]:
    """Conjugate gradients on every column of ``b [K, P]`` at once.

    Stops when every column has ``||r|| <= rtol ||b||``, after ``maxiter``
    iterations, or after ``max_seconds``; ``info`` says which.
    """
    start = time.perf_counter()
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rr = (r * r).sum(1)
    target = rtol * b.norm(dim=1)
    active = r.norm(dim=1) > target
    it = 0
    checkpoints: dict[str, torch.Tensor] = {}
    levels = [10.0**-k for k in range(1, 9)]
    while active.any() and it < maxiter:
        if time.perf_counter() - start > max_seconds:
            break
        q = op(p)
        alpha = torch.where(active, rr / (p * q).sum(1), torch.zeros_like(rr))
        x += alpha[:, None] * p
        r -= alpha[:, None] * q
        rr_new = (r * r).sum(1)
        beta = torch.where(active, rr_new / rr, torch.zeros_like(rr))
        p = r + beta[:, None] * p
        rr = rr_new
        active = r.norm(dim=1) > target
        it += 1
        worst = float((r.norm(dim=1) / b.norm(dim=1)).max())
        while levels and worst <= levels[0]:
            checkpoints[f"{levels.pop(0):.0e}"] = x.clone()
        if it % 10 == 0:
            rel = (r.norm(dim=1) / b.norm(dim=1)).max()
            print(f"  iteration {it}: max relative residual {rel:.2e}", flush=True)
    info = {
        "iterations": it,
        "max_relative_residual": float((r.norm(dim=1) / b.norm(dim=1)).max()),
        "converged": bool(not active.any()),
        "stopped_by_time": bool(time.perf_counter() - start > max_seconds),
        "checkpoints": checkpoints,
    }
    return x, info


def spectrum(op: Ggn) -> None:
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(1, op.size, generator=gen, dtype=torch.float64)
    for _ in range(20):
        w = op(v / v.norm()) - op.lam * v / v.norm()
        top = float(w.norm())
        v = w
    z = torch.randint(0, 2, (4, op.size), generator=gen).double() * 2 - 1
    mean = float((z * (op(z) - op.lam * z)).sum() / z.numel())
    print(f"GGN: largest eigenvalue ~{top:.3g}, mean eigenvalue ~{mean:.3g}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", required=True)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--rtol", type=float, default=1e-8)
    parser.add_argument("--maxiter", type=int, default=2000)
    parser.add_argument("--max-seconds", type=float, default=1200.0)
    parser.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    parser.add_argument("--spectrum", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    workload = load_scale(args.workload)
    op = Ggn(workload, workload.spec.hessian_regularization, args.dtype)
    if args.spectrum:
        start = time.perf_counter()
        op(torch.zeros(10, op.size, dtype=op.dtype))
        print(f"one [10, P] product: {time.perf_counter() - start:.2f} s")
        spectrum(op)
        return
    start = time.perf_counter()
    x_test = torch.from_numpy(workload.x_test).to(op.dtype)
    b = op.per_sample_grads(x_test, torch.from_numpy(workload.y_test))
    s, info = cg(op, b, args.rtol, args.maxiter, args.max_seconds)
    solve_s = time.perf_counter() - start
    checkpoints = info.pop("checkpoints")
    stacked = torch.cat([s, *checkpoints.values()])
    scores = []
    chunk = max(8, min(250, int(5e7 // op.size)))  # [chunk, P] float64 <= 400 MB
    for begin in range(0, len(op.x), chunk):
        g = op.per_sample_grads(
            op.x[begin : begin + chunk], op.y[begin : begin + chunk]
        )
        scores.append(stacked @ g.T)
    every = torch.cat(scores, dim=1).numpy()
    result, k = every[: len(s)], len(s)
    # How far the scores still moved: Pearson of each checkpoint (the first
    # iterate whose largest relative residual is below the level) with the end.
    info["pearson_at_residual"] = {
        level: float(
            np.corrcoef(every[k * (i + 1) : k * (i + 2)].ravel(), result.ravel())[0, 1]
        )
        for i, level in enumerate(checkpoints)
    }
    meta = {
        "tool": "reference",
        "method": f"cg-ggn-{args.dtype}",
        "workload": args.workload,
        "rtol": args.rtol,
        "regularization": op.lam,
        "solve_s": solve_s,
        "total_s": time.perf_counter() - start,
        **info,
    }
    write_result(args.out, meta, None, result)
    print(meta)


if __name__ == "__main__":
    main()
