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
    /* 1 when this CPU (and the OS) runs code built for the ISA level: 0 baseline, 1 AVX2+FMA+F16C,
       2 AVX-512 F/CD/DQ/BW/VL.  GCC and Clang on x86 only; elsewhere only the baseline. */
    static int cynorm_cpu_supports(int level) {
    #if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
        __builtin_cpu_init();
        if (level == 1)
            return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")
                && __builtin_cpu_supports("f16c");
        if (level == 2)
            return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512cd")
                && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw")
                && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx2")
                && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    #endif
        return level == 0;
    }
    """
    int CYNORM_HAVE_OPENMP
    const char* CYNORM_BUILD_FLAGS
    int omp_get_max_threads() noexcept nogil
    int omp_get_thread_num() noexcept nogil
    int cynorm_cpu_supports(int level) noexcept nogil
