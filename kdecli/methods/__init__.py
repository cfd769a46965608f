"""Attention approximation methods.  Built-in methods are imported here explicitly, in the order
`kdecli methods` lists them."""

from kdecli.methods.base import AttentionMethod, Param
from kdecli.methods.registry import get_method_class, make_method, method_names, register

from kdecli.methods import exact as _exact  # noqa: F401  (registers exact, mean)
from kdecli.methods import kdeformer as _kdeformer  # noqa: F401

__all__ = ["AttentionMethod", "Param", "get_method_class", "make_method", "method_names", "register"]
from kdecli.methods import hyperattention as _hyperattention  # noqa: E402,F401
from kdecli.methods import thinformer as _thinformer  # noqa: E402,F401
from kdecli.methods import nystromformer as _nystromformer  # noqa: E402,F401
from kdecli.methods import uniform as _uniform  # noqa: E402,F401
from kdecli.methods import oracles as _oracles  # noqa: E402,F401  (registers topk, rankk)
from kdecli.methods import performer as _performer  # noqa: E402,F401
from kdecli.methods import reformer as _reformer  # noqa: E402,F401
from kdecli.methods import scatterbrain as _scatterbrain  # noqa: E402,F401
