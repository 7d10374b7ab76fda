"""The INT8 passes, one file each. Adding a technique = one file here + one entry in Plan.default + one
parametrized test."""
from tledge.export.int8.passes.adaround import LearnedRounding
from tledge.export.int8.passes.bias_correction import BiasCorrection
from tledge.export.int8.passes.calibrate import Calibrate
from tledge.export.int8.passes.cle import Equalize
from tledge.export.int8.passes.fold import FoldShapes
from tledge.export.int8.passes.head_refit import HeadRefit
from tledge.export.int8.passes.pads import ExplicitPads
from tledge.export.int8.passes.ranges import Ranges

__all__ = ["BiasCorrection", "Calibrate", "Equalize", "ExplicitPads", "FoldShapes", "HeadRefit", "LearnedRounding",
           "Ranges"]
