"""BiSSL implicit-gradient machinery: solvers and Hessian-vector products on tensor tuples."""

from .implicit import (
    HessianVectorProduct,
    ImplicitGradInfo,
    RecomputingHessianVectorProduct,
    damped_matvec,
    functional_hvp,
    implicit_gradient,
)
from .solvers import (
    SOLVERS,
    MatVec,
    NonFiniteError,
    SolveInfo,
    TensorTuple,
    conjugate_gradient,
    get_solver,
    layerwise_conjugate_gradient,
    neumann_series,
    tuple_cosine,
    tuple_dot,
    tuple_norm,
)

__all__ = [
    "SOLVERS",
    "HessianVectorProduct",
    "ImplicitGradInfo",
    "MatVec",
    "NonFiniteError",
    "RecomputingHessianVectorProduct",
    "SolveInfo",
    "TensorTuple",
    "conjugate_gradient",
    "damped_matvec",
    "functional_hvp",
    "get_solver",
    "implicit_gradient",
    "layerwise_conjugate_gradient",
    "neumann_series",
    "tuple_cosine",
    "tuple_dot",
    "tuple_norm",
]
