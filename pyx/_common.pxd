# Shared declarations for cynorm's kernels: the fused float type and the OpenMP shim.
#
# Every OpenMP call goes through this shim, so that a build without OpenMP
# (CYNORM_OPENMP=0, or a compiler without it) still compiles and runs serially.

cimport cython

ctypedef cython.floating floating

cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    #define CYNORM_HAVE_OPENMP 1
    #else
    #define CYNORM_HAVE_OPENMP 0
    static int omp_get_max_threads(void) { return 1; }
    static int omp_get_thread_num(void) { return 0; }
    #endif
    #ifndef CYNORM_BUILD_FLAGS
    #define CYNORM_BUILD_FLAGS ""
    #endif
    """
    int CYNORM_HAVE_OPENMP
    const char* CYNORM_BUILD_FLAGS
    int omp_get_max_threads() noexcept nogil
    int omp_get_thread_num() noexcept nogil
