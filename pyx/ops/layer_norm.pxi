# LayerNorm, forward and backward: the centred form of the core's row normalizer
# (core/rows.pxi, core/rows_backward.pxi), with the residual-add form (add_layer_norm).
#
# Forward, per row: its moments (core/moments.pxi), then y = ((x - m_hi) - m_lo)·rstd·w + b.
# Backward, per row of n elements with x̂ = (x - mean)·rstd and g' = g·w:
#     dx = rstd·(g' - mean(g') - x̂·mean(g'·x̂)) (+ grad_residual),  dw += g·x̂,  db += g


def layer_norm(cnp.ndarray x, cnp.ndarray y, Py_ssize_t D, cnp.ndarray weight,
               cnp.ndarray bias, cnp.ndarray mean, cnp.ndarray rstd, double eps, int n_threads,
               cnp.ndarray mask=None, bint write_padding=True, cnp.ndarray residual=None,
               cnp.ndarray h=None, int half=-1):
    """y = (x - mean) * rstd * weight + bias over each row of D elements of x.

    x and y (same dtype) are C-contiguous or 2-D with contiguous rows; weight and bias are
    contiguous arrays of D elements or None; mean and rstd (float64, one per row) receive the
    statistics unless they are None.  mask (one bool per row, or None): rows it marks False are
    padding, not computed and written as 0 (not written at all with write_padding=False, for
    a y that holds zeros already: fresh zeroed pages then stay untouched).  residual and h
    (both or neither, laid out as x): h = x + residual is written, and normalized instead of x.
    half (HALF_F16, HALF_BF16; -1: none): x, y, residual and h are uint16 arrays of float16 or
    bfloat16 bits, weight and bias float32 (core/halves.pxi).
    """
    if half >= 0:
        run_half_norm(x, y, D, weight, bias, mean, rstd, eps, n_threads, mask, write_padding,
                      True, residual, h, half)
        return
    run_norm(x, y, D, weight, bias, mean, rstd, eps, n_threads, mask, write_padding, True,
             residual, h)


def layer_norm_backward(cnp.ndarray g, cnp.ndarray x, cnp.ndarray dx, Py_ssize_t D,
                        cnp.ndarray weight, cnp.ndarray mean, cnp.ndarray rstd,
                        cnp.ndarray grad_weight, cnp.ndarray grad_bias, int n_threads,
                        cnp.ndarray mask=None, cnp.ndarray grad_residual=None,
                        int half=-1):
    """dx from grad_out g and input x (same dtype, rows of D elements) and the saved float64
    mean and rstd (one per row); weight: D elements of x's dtype or None.

    grad_weight, grad_bias: D elements of x's dtype that receive Σ g·x̂ and Σ g over the rows,
    or None: summed in float64, per thread, then the threads' sums in order.  grad_residual
    (laid out as g, or None) is added to dx.  half (HALF_F16, HALF_BF16; -1: none): g, x, dx
    and grad_residual are 16-bit arrays of that kind, weight float32 or of that kind,
    grad_weight and grad_bias float32 (core/halves_backward.pxi).
    """
    if half >= 0:
        run_half_norm_backward(g, x, dx, D, weight, mean, rstd, grad_weight, grad_bias,
                               n_threads, mask, True, grad_residual, half)
        return
    run_norm_backward(g, x, dx, D, weight, mean, rstd, grad_weight, grad_bias, n_threads, mask,
                      True, grad_residual)
