# Core: the feature mapping of BatchNorm's layouts, written once.
#
# x is seen as (A, C, L) around its feature axis and walked as (rows, cols) with contiguous
# rows, in one of two layouts (the front end's _layout picks it):
# - by rows: (A*C, L), each row one feature's run of L elements: row i is feature i % C;
# - by columns: (A, C*L), each row one sample: column j is feature j // L.
# Every BatchNorm kernel (forward, backward, the moments) finds a row's or a column's feature
# through these, and the entry points check the shape against the layout with layout_fits.

cdef inline Py_ssize_t row_feature(Py_ssize_t i, Py_ssize_t C) noexcept nogil:
    """The feature of row i in the layout by rows."""
    return i % C


cdef inline Py_ssize_t column_feature(Py_ssize_t j, Py_ssize_t L) noexcept nogil:
    """The feature of column j in the layout by columns, L columns per feature."""
    return j // L


cdef inline bint layout_fits(Py_ssize_t rows, Py_ssize_t cols, Py_ssize_t C,
                             bint by_rows) noexcept nogil:
    """Whether (rows, cols) holds whole features of C in its layout."""
    return C > 0 and not (rows % C if by_rows else cols % C)
