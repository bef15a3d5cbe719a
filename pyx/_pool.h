/* cynorm's cache of large output buffers (a NumPy memory handler).

   A fresh large NumPy array costs the kernel zeroing every page of it on first touch (about
   12 GB/s on the reference machine, as much as the normalization itself), and in a loop that
   drops its previous output the same pages go back to the OS and are faulted in again on the
   next call.  Large outputs of cynorm's calls are therefore allocated through this handler:
   a buffer freed by NumPy is kept (up to a byte limit, oldest evicted first) and handed to the
   next output of about its size, already mapped.  Arrays made here are ordinary NumPy arrays
   that own their data (NumPy stores the handler in each array and frees through it); only the
   allocations cynorm makes itself, while it has the handler set, come from here.

   Every buffer carries a small header before its data: the pointer malloc returned and the
   capacity, so free and realloc need no lookup.  The data starts at a chosen offset (the
   phase) within a 64-byte cache line: the input's own, so that the kernels' loads and their
   streaming stores keep the same place in their lines (see cynorm_pool_empty).  Callers hold
   the GIL (NumPy allocates and frees array data with it held); free-threaded builds take a
   mutex. */
#ifndef CYNORM_POOL_H
#define CYNORM_POOL_H

#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "policy.h"  /* CYNORM_POOL_SLOTS */

#define CYNORM_POOL_ALIGN 64

typedef struct {
    void *data;
    size_t cap;
} cynorm_pool_block;

static struct {
    size_t phase;   /* where the next buffer's data starts in its line (cynorm_pool_empty) */
    size_t limit;   /* bytes the cache may hold; 0: nothing is kept */
    size_t held;    /* bytes it holds now */
    int n;          /* blocks held, oldest first */
    cynorm_pool_block block[CYNORM_POOL_SLOTS];
    size_t hits, misses;
#ifdef Py_GIL_DISABLED
    PyMutex mutex;
#endif
} cynorm_pool;

#ifdef Py_GIL_DISABLED
#define CYNORM_POOL_LOCK() PyMutex_Lock(&cynorm_pool.mutex)
#define CYNORM_POOL_UNLOCK() PyMutex_Unlock(&cynorm_pool.mutex)
#else
#define CYNORM_POOL_LOCK()
#define CYNORM_POOL_UNLOCK()
#endif

static size_t *cynorm_pool_cap(void *data) { return (size_t *)data - 1; }
static void **cynorm_pool_base(void *data) { return (void **)data - 2; }

/* Ask Linux for transparent huge pages over [p, p + n) (the whole 4 KiB pages in it), as NumPy
   does for the arrays of 4 MiB and more that its default handler allocates (a handler of one's
   own is not advised by NumPy).  Whether a buffer got them depended otherwise on what memory
   malloc reused.  The buffers made here are such outputs (or a resize of one). */
static void cynorm_pool_hugepages(char *p, size_t n) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    uintptr_t lo = ((uintptr_t)p + 4095) & ~(uintptr_t)4095;
    uintptr_t hi = ((uintptr_t)p + n) & ~(uintptr_t)4095;
    if (hi > lo)
        (void)madvise((void *)lo, hi - lo, MADV_HUGEPAGE);  /* advice: failure changes nothing */
#else
    (void)p;
    (void)n;
#endif
}

/* The data of a buffer malloc returned at base, placed at the current phase, with its header
   written in front of it.  A buffer has room for every phase, so a held one can be handed out
   again at another. */
static void *cynorm_pool_place(char *base, size_t cap) {
    char *data = (char *)(((uintptr_t)base + 2 * sizeof(void *) + CYNORM_POOL_ALIGN - 1)
                          & ~(uintptr_t)(CYNORM_POOL_ALIGN - 1)) + cynorm_pool.phase;
    *cynorm_pool_base(data) = base;
    *cynorm_pool_cap(data) = cap;
    return data;
}

/* A new buffer of cap bytes, outside the cache. */
static void *cynorm_pool_new(size_t cap) {
    size_t room = 2 * sizeof(void *) + 2 * (CYNORM_POOL_ALIGN - 1);
    char *base;
    if (cap > SIZE_MAX - room)
        return NULL;
    base = (char *)malloc(cap + room);
    if (base == NULL)
        return NULL;
    cynorm_pool_hugepages(base, cap + room);
    return cynorm_pool_place(base, cap);
}

static void cynorm_pool_release(void *data) { free(*cynorm_pool_base(data)); }

/* Drop the oldest blocks until at most `keep` bytes are held.  Caller holds the lock. */
static void cynorm_pool_trim(size_t keep) {
    while (cynorm_pool.n > 0 && cynorm_pool.held > keep) {
        cynorm_pool_block b = cynorm_pool.block[0];
        memmove(cynorm_pool.block, cynorm_pool.block + 1,
                (size_t)(cynorm_pool.n - 1) * sizeof(cynorm_pool_block));
        cynorm_pool.n--;
        cynorm_pool.held -= b.cap;
        cynorm_pool_release(b.data);
    }
}

/* A held block of capacity in [size, size + size / 4] (the smallest such), else a new one. */
static void *cynorm_pool_malloc(void *ctx, size_t size) {
    int k, best = -1;
    void *data;
    (void)ctx;
    if (size == 0)
        size = 1;
    CYNORM_POOL_LOCK();
    for (k = 0; k < cynorm_pool.n; k++) {
        size_t cap = cynorm_pool.block[k].cap;
        if (cap >= size && cap - size <= size / 4
                && (best < 0 || cap < cynorm_pool.block[best].cap))
            best = k;
    }
    if (best >= 0) {
        data = cynorm_pool_place(*cynorm_pool_base(cynorm_pool.block[best].data),
                                 cynorm_pool.block[best].cap);
        cynorm_pool.held -= cynorm_pool.block[best].cap;
        memmove(cynorm_pool.block + best, cynorm_pool.block + best + 1,
                (size_t)(cynorm_pool.n - best - 1) * sizeof(cynorm_pool_block));
        cynorm_pool.n--;
        cynorm_pool.hits++;
        CYNORM_POOL_UNLOCK();
        return data;
    }
    cynorm_pool.misses++;
    CYNORM_POOL_UNLOCK();
    return cynorm_pool_new(size);
}

static void *cynorm_pool_calloc(void *ctx, size_t nelem, size_t elsize) {
    void *data;
    if (elsize != 0 && nelem > SIZE_MAX / elsize)
        return NULL;
    data = cynorm_pool_malloc(ctx, nelem * elsize);
    if (data != NULL)
        memset(data, 0, nelem * elsize);
    return data;
}

/* Kept (up to the limit, the oldest blocks making room) or given back to malloc. */
static void cynorm_pool_free(void *ctx, void *data, size_t size) {
    size_t cap;
    (void)ctx;
    (void)size;  /* the header knows the capacity */
    if (data == NULL)
        return;
    cap = *cynorm_pool_cap(data);
    CYNORM_POOL_LOCK();
    if (cap <= cynorm_pool.limit) {
        if (cynorm_pool.n == CYNORM_POOL_SLOTS)
            cynorm_pool_trim(cynorm_pool.held - cynorm_pool.block[0].cap);
        cynorm_pool_trim(cynorm_pool.limit - cap);
        cynorm_pool.block[cynorm_pool.n].data = data;
        cynorm_pool.block[cynorm_pool.n].cap = cap;
        cynorm_pool.n++;
        cynorm_pool.held += cap;
        data = NULL;
    }
    CYNORM_POOL_UNLOCK();
    if (data != NULL)
        cynorm_pool_release(data);
}

static void *cynorm_pool_realloc(void *ctx, void *data, size_t new_size) {
    void *grown;
    size_t cap;
    if (data == NULL)
        return cynorm_pool_malloc(ctx, new_size);
    cap = *cynorm_pool_cap(data);
    if (new_size <= cap)
        return data;
    grown = cynorm_pool_malloc(ctx, new_size);
    if (grown != NULL) {
        memcpy(grown, data, cap);
        cynorm_pool_free(ctx, data, cap);
    }
    return grown;
}

static PyDataMem_Handler cynorm_pool_handler = {
    "cynorm_output_cache",
    1,
    {NULL, cynorm_pool_malloc, cynorm_pool_calloc, cynorm_pool_realloc, cynorm_pool_free},
};

static PyObject *cynorm_pool_capsule = NULL;

/* An uninitialized array of this shape and type whose data comes from the cache: NumPy's
   current handler is swapped for this one around the allocation only.  Its data starts
   `phase` bytes (below CYNORM_POOL_ALIGN) into a cache line: the kernels' streaming stores
   took longer where the input they read started at another place in its line
   (benchmarks/RESULTS.md, items 66 and 67).  Free-threaded builds may race on the phase: that moves where a buffer starts, never
   what it holds. */
static PyObject *cynorm_pool_empty(int nd, npy_intp *dims, int typenum, size_t phase) {
    PyObject *old, *arr, *back;
    if (cynorm_pool_capsule == NULL) {
        cynorm_pool_capsule = PyCapsule_New(&cynorm_pool_handler, "mem_handler", NULL);
        if (cynorm_pool_capsule == NULL)
            return NULL;
    }
    old = PyDataMem_SetHandler(cynorm_pool_capsule);
    if (old == NULL)
        return NULL;
    cynorm_pool.phase = phase % CYNORM_POOL_ALIGN;
    arr = PyArray_EMPTY(nd, dims, typenum, 0);
    cynorm_pool.phase = 0;
    back = PyDataMem_SetHandler(old);
    Py_DECREF(old);
    if (back == NULL) {
        Py_XDECREF(arr);
        return NULL;
    }
    Py_DECREF(back);
    return arr;
}

static size_t cynorm_pool_limit(void) { return cynorm_pool.limit; }

/* Set the byte limit (held blocks beyond it are freed); returns the previous one. */
static size_t cynorm_pool_set_limit(size_t limit) {
    size_t before;
    CYNORM_POOL_LOCK();
    before = cynorm_pool.limit;
    cynorm_pool.limit = limit;
    cynorm_pool_trim(limit);
    CYNORM_POOL_UNLOCK();
    return before;
}

/* limit, bytes held, blocks held, hits, misses */
static void cynorm_pool_info(size_t *info) {
    CYNORM_POOL_LOCK();
    info[0] = cynorm_pool.limit;
    info[1] = cynorm_pool.held;
    info[2] = (size_t)cynorm_pool.n;
    info[3] = cynorm_pool.hits;
    info[4] = cynorm_pool.misses;
    CYNORM_POOL_UNLOCK();
}

#endif
