"""BiSSL implicit-gradient machinery: curvatures, solvers and the stage system, on tensor tuples.

Read in this order: :mod:`.krylov` (tuples, ``SolveInfo``), :mod:`.solvers` and :mod:`.lanczos`
(``solve(matvec, b, ...) -> (x, SolveInfo)``), :mod:`.hvp` and :mod:`.curvature` /
:mod:`.fisher` (the matrix ``C``), :mod:`.registry` (every solver and curvature by its config
name), :mod:`.stage` (the system ``(I + C / (lam + delta)) x = g`` that everything solves).
"""

from .curvature import (
    GGN_JV_MODES,
    Curvature,
    GaussNewtonCurvature,
    HessianCurvature,
    ProductCurvature,
    batch_statistics_only,
    gauss_newton_of_batch,
    hessian_of_batch,
    output_jvp,
    scratch_buffers,
)
from .fisher import EmpiricalFisherCurvature
from .hvp import (
    HessianVectorProduct,
    RecomputingHessianVectorProduct,
    check_vector,
    functional_hvp,
)
from .krylov import (
    NEGATIVE_CURVATURE_MODES,
    IndefiniteSystemError,
    MatVec,
    NonFiniteError,
    SolveInfo,
    TensorTuple,
    true_residual,
    tuple_cosine,
    tuple_dot,
    tuple_norm,
)
from .lanczos import LanczosBasis, RitzInfo, lanczos_extremes, lanczos_solve
from .registry import (
    CURVATURES,
    SOLVERS,
    CurvatureKind,
    Solver,
    get_curvature,
    get_solver,
    pretext_curvature,
)
from .solvers import (
    conjugate_gradient,
    direct_solve,
    layerwise_conjugate_gradient,
    neumann_series,
)
from .stage import (
    ImplicitGradInfo,
    StageSystem,
    damped_matvec,
    implicit_gradient,
    joint_damped_matvec,
)

__all__ = [
    "CURVATURES",
    "GGN_JV_MODES",
    "NEGATIVE_CURVATURE_MODES",
    "SOLVERS",
    "Curvature",
    "CurvatureKind",
    "EmpiricalFisherCurvature",
    "GaussNewtonCurvature",
    "HessianCurvature",
    "HessianVectorProduct",
    "ImplicitGradInfo",
    "IndefiniteSystemError",
    "LanczosBasis",
    "MatVec",
    "NonFiniteError",
    "ProductCurvature",
    "RecomputingHessianVectorProduct",
    "RitzInfo",
    "SolveInfo",
    "Solver",
    "StageSystem",
    "TensorTuple",
    "batch_statistics_only",
    "check_vector",
    "conjugate_gradient",
    "damped_matvec",
    "direct_solve",
    "functional_hvp",
    "gauss_newton_of_batch",
    "get_curvature",
    "get_solver",
    "hessian_of_batch",
    "implicit_gradient",
    "joint_damped_matvec",
    "lanczos_extremes",
    "lanczos_solve",
    "layerwise_conjugate_gradient",
    "neumann_series",
    "output_jvp",
    "pretext_curvature",
    "scratch_buffers",
    "true_residual",
    "tuple_cosine",
    "tuple_dot",
    "tuple_norm",
]
