# RMSNorm, forward and backward: the uncentred form of the core's row normalizer
# (core/rows.pxi, core/rows_backward.pxi), with the residual-add form (add_rms_norm).
#
# Forward, per row of n: rstd = 1 / sqrt(Σx² / n + eps) (Σx² in float64), y = x·rstd·w.
# Backward, with x̂ = x·rstd and g' = g·w:
#     dx = rstd·g' - x̂·rstd·mean(g'·x̂) (+ grad_residual),  dw += g·x̂


def rms_norm(cnp.ndarray x, cnp.ndarray y, Py_ssize_t D, cnp.ndarray weight, cnp.ndarray rstd,
             double eps, int n_threads, cnp.ndarray mask=None, bint write_padding=True,
             cnp.ndarray residual=None, cnp.ndarray h=None,
             int half=-1):
    """y = x * rstd * weight over each row of D elements of x, as layer_norm (the same
    arguments, without bias and mean)."""
    if half >= 0:
        run_half_norm(x, y, D, weight, None, None, rstd, eps, n_threads, mask, write_padding,
                      False, residual, h, half)
        return
    run_norm(x, y, D, weight, None, None, rstd, eps, n_threads, mask, write_padding, False,
             residual, h)


def rms_norm_backward(cnp.ndarray g, cnp.ndarray x, cnp.ndarray dx, Py_ssize_t D,
                      cnp.ndarray weight, cnp.ndarray rstd, cnp.ndarray grad_weight,
                      int n_threads, cnp.ndarray mask=None, cnp.ndarray grad_residual=None,
                      int half=-1):
    """dx (and grad_weight = Σ g·x̂ unless None) as layer_norm_backward, without the mean."""
    if half >= 0:
        run_half_norm_backward(g, x, dx, D, weight, None, rstd, grad_weight, None, n_threads,
                               mask, False, grad_residual, half)
        return
    run_norm_backward(g, x, dx, D, weight, None, rstd, grad_weight, None, n_threads, mask,
                      False, grad_residual)
