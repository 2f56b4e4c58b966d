"""RTN: round each weight to the nearest grid point. No calibration data."""
from quasr.methods import Method, register
from quasr.quant.grid import rtn


def solve(W, stats, cfg, name, ctx=None):
    return rtn(W, cfg.grid(), name), {}


register(Method("rtn", solve, needs_calibration=False, doc="round to nearest"))
