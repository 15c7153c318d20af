/* The ONNX Runtime custom op edgeforge.MatMulQ: Y[..., N] = X[..., K] W^T, W 4- or 8-bit in
 * kernels.c's layout (one copy, read where ONNX Runtime placed the initializer). Registered by
 * RegisterCustomOps, the entry ONNX Runtime looks up in a library passed to
 * SessionOptions.register_custom_ops_library. Rows are spread over ONNX Runtime's own intra-op
 * threads (KernelContext_ParallelFor): a second pool would spin against it on small CPUs.
 *
 * Attributes: K, N, bits (4 or 8). Inputs: X float32 [..., K]; W uint8, edgeforge_packed_bytes(N, K,
 * bits) bytes.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ort_abi.h"

typedef void (*quantize_fn)(int, const float *, int8_t *, float *, int32_t *);
typedef void (*matmul_fn)(int, int, const uint8_t *, int, int, int, const int8_t *, const float *, const int32_t *,
                          float *);
#define KERNEL_SET(isa)                                                                                        \
    void quantize_row_##isa(int, const float *, int8_t *, float *, int32_t *);                                 \
    void matmul_q4_##isa(int, int, const uint8_t *, int, int, int, const int8_t *, const float *, const int32_t *, \
                         float *);                                                                             \
    void matmul_q8_##isa(int, int, const uint8_t *, int, int, int, const int8_t *, const float *, const int32_t *, \
                         float *);
KERNEL_SET(avx2)
KERNEL_SET(vnni)

static const OrtApi *api;
static quantize_fn quantize;
static matmul_fn matmul4, matmul8;
static const char *isa = "none";

/* The kernel set this CPU runs: "avx512vnni" or "avx2"; "none" when it has neither (no AVX2: the op
 * refuses to run rather than fault). EDGEFORGE_KERNELS_ISA=avx2 holds a VNNI CPU to the AVX2 kernels
 * (tests, and comparing the two on one machine). */
__attribute__((visibility("default"))) const char *edgeforge_kernels_isa(void) {
    __builtin_cpu_init();
    const char *force = getenv("EDGEFORGE_KERNELS_ISA");
    const int allow_vnni = !(force && strcmp(force, "avx2") == 0);
    if (allow_vnni && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx2") &&
        __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
        quantize = quantize_row_vnni, matmul4 = matmul_q4_vnni, matmul8 = matmul_q8_vnni, isa = "avx512vnni";
    else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
        quantize = quantize_row_avx2, matmul4 = matmul_q4_avx2, matmul8 = matmul_q8_avx2, isa = "avx2";
    return isa;
}

/* Bytes of W for N rows of K weights (K % 32 == 0), as kernels/__init__.py pack_blocks writes them:
 * groups of 8 rows, 16 + 32 x bits bytes a block of 32. */
__attribute__((visibility("default"))) size_t edgeforge_packed_bytes(int64_t n, int64_t k, int64_t bits) {
    return (size_t)((n + 7) / 8) * (size_t)(k / 32) * (size_t)(16 + 32 * bits);
}

typedef struct {
    int64_t k, n, bits;
} Kernel;

static OrtStatus *fail(const char *fmt, long long a, long long b) {
    char msg[256];
    snprintf(msg, sizeof msg, fmt, a, b);
    return EF_CreateStatus(api)(EF_ORT_INVALID_ARGUMENT, msg);
}

#define TRY(call)                             \
    do {                                      \
        OrtStatus *status_ = (call);          \
        if (status_) return status_;          \
    } while (0)

static OrtStatus *create_kernel(const OrtCustomOp *op, const OrtApi *a, const OrtKernelInfo *info, void **out) {
    (void)op, (void)a;
    Kernel kernel;
    TRY(EF_KernelInfoGetAttribute_int64(api)(info, "K", &kernel.k));
    TRY(EF_KernelInfoGetAttribute_int64(api)(info, "N", &kernel.n));
    TRY(EF_KernelInfoGetAttribute_int64(api)(info, "bits", &kernel.bits));
    if (kernel.k <= 0 || kernel.k % 32 || kernel.n <= 0 || kernel.k > (1 << 24) || kernel.n > (1 << 24))
        return fail("edgeforge.MatMulQ: K = %lld must be a positive multiple of 32 and N = %lld positive", kernel.k,
                    kernel.n);
    if (kernel.bits != 4 && kernel.bits != 8)
        return fail("edgeforge.MatMulQ: bits = %lld, only 4 or 8 (K = %lld)", kernel.bits, kernel.k);
    if (!matmul4) return fail("edgeforge.MatMulQ: this CPU has no AVX2/FMA/F16C (%lld, %lld)", kernel.k, kernel.n);
    Kernel *k = malloc(sizeof *k);
    if (!k) return fail("edgeforge.MatMulQ: out of memory (%lld, %lld)", kernel.k, kernel.n);
    *k = kernel, *out = k;
    return NULL;
}

typedef struct {
    const Kernel *kernel;
    const float *x;
    const uint8_t *w;
    float *y;
    int8_t *act;
    float *d;
    int32_t *z;
    int64_t m, groups, tasks;
} Job;

static void quantize_rows(void *data, size_t task) {
    const Job *job = data;
    const int64_t k = job->kernel->k, r0 = job->m * (int64_t)task / job->tasks, r1 = job->m * (int64_t)(task + 1) / job->tasks;
    for (int64_t r = r0; r < r1; r++)
        quantize((int)k, job->x + r * k, job->act + r * k, job->d + r * (k / 32), job->z + r * (k / 32));
}

static void matmul_groups(void *data, size_t task) {
    const Job *job = data;
    const int64_t g0 = job->groups * (int64_t)task / job->tasks, g1 = job->groups * (int64_t)(task + 1) / job->tasks;
    if (g0 < g1)
        (job->kernel->bits == 8 ? matmul8 : matmul4)((int)job->kernel->n, (int)job->kernel->k, job->w, (int)g0, (int)g1, (int)job->m, job->act, job->d,
               job->z, job->y);
}

static OrtStatus *compute(void *data, OrtKernelContext *ctx) {
    const Kernel *kernel = data;
    const OrtValue *x, *w;
    TRY(EF_KernelContext_GetInput(api)(ctx, 0, &x));
    TRY(EF_KernelContext_GetInput(api)(ctx, 1, &w));
    int64_t dims[8], wdims[8];
    size_t rank, wrank;
    OrtTensorTypeAndShapeInfo *info;
    TRY(EF_GetTensorTypeAndShape(api)(x, &info));
    OrtStatus *status = EF_GetDimensionsCount(api)(info, &rank);
    if (!status && (rank < 1 || rank > 8)) status = fail("edgeforge.MatMulQ: X has rank %lld (1 to %lld)", (long long)rank, 8);
    if (!status) status = EF_GetDimensions(api)(info, dims, rank);
    EF_ReleaseTensorTypeAndShapeInfo(api)(info);
    if (status) return status;
    TRY(EF_GetTensorTypeAndShape(api)(w, &info));
    status = EF_GetDimensionsCount(api)(info, &wrank);
    if (!status && (wrank < 1 || wrank > 8)) status = fail("edgeforge.MatMulQ: W has rank %lld (1 to %lld)", (long long)wrank, 8);
    if (!status) status = EF_GetDimensions(api)(info, wdims, wrank);
    EF_ReleaseTensorTypeAndShapeInfo(api)(info);
    if (status) return status;
    int64_t wbytes = 1, m = 1;
    for (size_t i = 0; i < wrank; i++) wbytes *= wdims[i];
    if ((size_t)wbytes != edgeforge_packed_bytes(kernel->n, kernel->k, kernel->bits))
        return fail("edgeforge.MatMulQ: W has %lld bytes, the packed weight needs %lld", wbytes,
                    (long long)edgeforge_packed_bytes(kernel->n, kernel->k, kernel->bits));
    if (dims[rank - 1] != kernel->k)
        return fail("edgeforge.MatMulQ: X's last dimension is %lld, K is %lld", dims[rank - 1], kernel->k);
    for (size_t i = 0; i + 1 < rank; i++) m *= dims[i];
    dims[rank - 1] = kernel->n;
    OrtValue *y;
    TRY(EF_KernelContext_GetOutput(api)(ctx, 0, dims, rank, &y));
    if (m == 0) return NULL;
    Job job = {.kernel = kernel, .m = m, .groups = (kernel->n + 7) / 8};
    TRY(EF_GetTensorMutableData(api)((OrtValue *)x, (void **)&job.x));
    TRY(EF_GetTensorMutableData(api)((OrtValue *)w, (void **)&job.w));
    TRY(EF_GetTensorMutableData(api)(y, (void **)&job.y));
    /* scratch per call: the same session may run on several threads at once (serve) */
    const size_t nb = (size_t)(kernel->k / 32);
    float *scales = malloc((size_t)m * nb * (sizeof(float) + sizeof(int32_t)));
    int8_t *act = malloc((size_t)m * (size_t)kernel->k);
    if (!scales || !act) {
        free(scales), free(act);
        return fail("edgeforge.MatMulQ: out of memory for %lld rows of %lld", m, kernel->k);
    }
    job.act = act, job.d = scales, job.z = (int32_t *)(scales + (size_t)m * nb);
    job.tasks = m < 64 ? m : 64;
    status = EF_KernelContext_ParallelFor(api)(ctx, quantize_rows, (size_t)job.tasks, 0, &job);
    if (!status) {
        job.tasks = job.groups < 64 ? job.groups : 64; /* ORT hands them to its threads as they free up */
        status = EF_KernelContext_ParallelFor(api)(ctx, matmul_groups, (size_t)job.tasks, 0, &job);
    }
    free(scales), free(act);
    return status;
}

static void destroy_kernel(void *kernel) { free(kernel); }
static const char *op_name(const OrtCustomOp *op) { (void)op; return "MatMulQ"; }
static const char *op_provider(const OrtCustomOp *op) { (void)op; return NULL; } /* CPU */
static int input_type(const OrtCustomOp *op, size_t i) { (void)op; return i == 0 ? EF_TENSOR_FLOAT : EF_TENSOR_UINT8; }
static size_t input_count(const OrtCustomOp *op) { (void)op; return 2; }
static int output_type(const OrtCustomOp *op, size_t i) { (void)op, (void)i; return EF_TENSOR_FLOAT; }
static size_t output_count(const OrtCustomOp *op) { (void)op; return 1; }
static int required(const OrtCustomOp *op, size_t i) { (void)op, (void)i; return EF_IO_REQUIRED; }
static int default_memory(const OrtCustomOp *op, size_t i) { (void)op, (void)i; return EF_MEM_DEFAULT; }
static int one(const OrtCustomOp *op) { (void)op; return 1; }

static OrtCustomOp matmul_q_op = {
    .version = EF_CUSTOM_OP_VERSION,
    .GetName = op_name,
    .GetExecutionProviderType = op_provider,
    .GetInputType = input_type,
    .GetInputTypeCount = input_count,
    .GetOutputType = output_type,
    .GetOutputTypeCount = output_count,
    .KernelDestroy = destroy_kernel,
    .GetInputCharacteristic = required,
    .GetOutputCharacteristic = required,
    .GetInputMemoryType = default_memory,
    .GetVariadicInputMinArity = one,
    .GetVariadicInputHomogeneity = one,
    .GetVariadicOutputMinArity = one,
    .GetVariadicOutputHomogeneity = one,
    .CreateKernelV2 = create_kernel,
    .KernelComputeV2 = compute,
};

__attribute__((visibility("default"))) OrtStatus *RegisterCustomOps(OrtSessionOptions *options, const OrtApiBase *base) {
    api = base->GetApi(EF_ORT_API_VERSION);
    if (!api) return NULL; /* onnxruntime older than 1.17: the session then fails on the unknown op, by name */
    edgeforge_kernels_isa();
    OrtCustomOpDomain *domain;
    TRY(EF_CreateCustomOpDomain(api)("edgeforge", &domain));
    TRY(EF_CustomOpDomain_Add(api)(domain, &matmul_q_op));
    return EF_AddCustomOpDomain(api)(options, domain);
}
