"""Token sampling on the device (not a graph op: the cuda runtime's last step of a decode).

The reference is `mmc.runtime.sampling.select` (numpy): temperature, then top-k, then top-p
(nucleus: the smallest set of most likely tokens whose probability reaches top_p), then a draw
from the renormalized distribution. `kernels.sample` computes the same without sorting the
vocabulary: thresholds are found by bisection (see its docstring) and the draw is a Gumbel-max
over the kept tokens. Ties at a threshold are kept together (the reference's stable sort may
split a tie group at the top-k / top-p boundary).
"""
