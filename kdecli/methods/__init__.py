"""Attention approximation methods.  Built-in methods are imported here explicitly, in the order
`kdecli methods` lists them: the reference and the floor, the KDEformer paper's method and its
baselines, the methods that came after, then the analysis-only oracles."""

from kdecli.methods.base import AttentionMethod, Param
from kdecli.methods.registry import (
    get_method_class,
    make_method,
    method_names,
    method_of_role,
    register,
)

# Registration order is the order `kdecli methods` lists them.
# isort: off
from kdecli.methods import exact as _exact  # noqa: F401  (registers exact, mean)
from kdecli.methods import kdeformer as _kdeformer  # noqa: F401
from kdecli.methods import performer as _performer  # noqa: F401
from kdecli.methods import reformer as _reformer  # noqa: F401
from kdecli.methods import scatterbrain as _scatterbrain  # noqa: F401
from kdecli.methods import hyperattention as _hyperattention  # noqa: F401
from kdecli.methods import thinformer as _thinformer  # noqa: F401
from kdecli.methods import nystromformer as _nystromformer  # noqa: F401
from kdecli.methods import uniform as _uniform  # noqa: F401
from kdecli.methods import streaming as _streaming  # noqa: F401
from kdecli.methods import quest as _quest  # noqa: F401
from kdecli.methods import magicpig as _magicpig  # noqa: F401
from kdecli.methods import h2o as _h2o  # noqa: F401
from kdecli.methods import snapkv as _snapkv  # noqa: F401
from kdecli.methods import blocktopk as _blocktopk  # noqa: F401
from kdecli.methods import vertical_slash as _vertical_slash  # noqa: F401
from kdecli.methods import xattention as _xattention  # noqa: F401
from kdecli.methods import flexprefill as _flexprefill  # noqa: F401
from kdecli.methods import oracles as _oracles  # noqa: F401  (registers topk, rankk)
from kdecli.methods import page_oracle as _page_oracle  # noqa: F401  (registers topk_pages)
from kdecli.methods import tile_oracle as _tile_oracle  # noqa: F401  (registers topk_tiles)
# isort: on

__all__ = [
    "AttentionMethod",
    "Param",
    "get_method_class",
    "make_method",
    "method_names",
    "method_of_role",
    "register",
]
