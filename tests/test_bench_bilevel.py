"""bench_bilevel's operator counts: what runs in products, in the solver and elsewhere."""

from __future__ import annotations

from benchmarks.bench_bilevel import counting_ops
from benchmarks.harness import OpCounter
from bissl_det.bilevel import ProductCurvature, StageSystem

import torch


def test_op_counter_skips_views_and_counts_each_operator():
    t = torch.randn(4, 3)
    with OpCounter() as counter:
        t.view(12).reshape(3, 4).t()  # views: nothing launched
        torch.promote_types(t.dtype, torch.float64)  # dtypes only: nothing launched
        (t + 1).sum()
    assert counter.ops == 2
    assert counter.by_name == {"aten.add.Tensor": 1, "aten.sum.default": 1}


def stage_ops(shapes: list[tuple[int, ...]]) -> tuple[dict, int, int]:
    """Operators of one CG solve of a 20 x 20 SPD system whose vector is cut into ``shapes``."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(20, 20, generator=gen, dtype=torch.float64)
    a = a @ a.T / 20
    sizes = [torch.Size(s).numel() for s in shapes]

    def product(v):
        out = a @ torch.cat([t.reshape(-1) for t in v])
        return tuple(p.reshape(s).clone() for p, s in zip(out.split(sizes), shapes, strict=True))

    g = tuple(torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes)
    with OpCounter() as one_product:
        product(g)
    system = StageSystem(ProductCurvature(product), 1.0, 0.0, "cg", max_iter=4)
    with counting_ops() as ops:
        torch.zeros(3).add_(1.0)  # two operators outside any solve
        system.solve(g)
    return ops, one_product.ops, system.stage_products()


def test_stage_operators_split_into_products_solver_and_the_rest():
    ops, per_product, products = stage_ops([(4, 2), (12,)])
    assert products == 4
    assert ops["curvature_products"] == products * per_product
    assert ops["steps"] == 2
    assert ops["total"] == ops["curvature_products"] + ops["solver_vectors"] + ops["steps"]
    # The solver's vector work does not grow with the number of tensors (one flat buffer).
    many, _, _ = stage_ops([(2,)] * 10)
    assert many["solver_vectors"] == ops["solver_vectors"] > 0
