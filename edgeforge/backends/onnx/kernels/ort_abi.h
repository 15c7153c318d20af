/* The part of ONNX Runtime's C ABI that a custom-op library needs, declared by us.
 *
 * No package registry reachable here ships onnxruntime_c_api.h (not the PyPI wheel, not npm, not
 * Debian bookworm), so this declares the few entries we call. The ABI is append-only: OrtApi is a
 * table of function pointers whose order never changes between releases, and OrtCustomOp a struct
 * whose fields are only ever appended. The indices below are the positions of those functions in
 * OrtApi as published for ORT_API_VERSION 24 (onnxruntime 1.24: every member of `struct OrtApi`
 * counted in order; the count agrees with the static_asserts of onnxruntime_c_api.cc, e.g.
 * ReleaseCustomOpDomain 101, ReleaseKernelInfo 218, GetBuildInfoString 254, and the first entry of
 * version 18 at 275). tests/test_onnx_kernels.py runs every entry used here. We ask ONNX Runtime
 * for API version 17 (onnxruntime 1.17, where KernelContext_ParallelFor appeared), so any runtime
 * from 1.17 on serves these entries at these positions.
 */
#ifndef EDGEFORGE_ORT_ABI_H
#define EDGEFORGE_ORT_ABI_H
#include <stddef.h>
#include <stdint.h>

#define EF_ORT_API_VERSION 17

typedef struct OrtStatus OrtStatus;
typedef struct OrtApi OrtApi; /* read as a table of function pointers, never dereferenced otherwise */
typedef struct OrtKernelInfo OrtKernelInfo;
typedef struct OrtKernelContext OrtKernelContext;
typedef struct OrtValue OrtValue;
typedef struct OrtTensorTypeAndShapeInfo OrtTensorTypeAndShapeInfo;
typedef struct OrtCustomOpDomain OrtCustomOpDomain;
typedef struct OrtSessionOptions OrtSessionOptions;

typedef struct OrtApiBase {
    const OrtApi *(*GetApi)(uint32_t version);
    const char *(*GetVersionString)(void);
} OrtApiBase;

enum { EF_ORT_FAIL = 1, EF_ORT_INVALID_ARGUMENT = 2 };       /* OrtErrorCode */
enum { EF_TENSOR_FLOAT = 1, EF_TENSOR_UINT8 = 2 };            /* ONNXTensorElementDataType */
enum { EF_IO_REQUIRED = 0 };                                  /* OrtCustomOpInputOutputCharacteristic */
enum { EF_MEM_DEFAULT = 0 };                                  /* OrtMemType */

/* struct OrtCustomOp, fields through version 16 (KernelComputeV2): we set version = 16 so that
 * ONNX Runtime reads no field past InferOutputShapeFn's predecessors. */
typedef struct OrtCustomOp {
    uint32_t version;
    void *(*CreateKernel)(const struct OrtCustomOp *op, const OrtApi *api, const OrtKernelInfo *info);
    const char *(*GetName)(const struct OrtCustomOp *op);
    const char *(*GetExecutionProviderType)(const struct OrtCustomOp *op);
    int (*GetInputType)(const struct OrtCustomOp *op, size_t index);
    size_t (*GetInputTypeCount)(const struct OrtCustomOp *op);
    int (*GetOutputType)(const struct OrtCustomOp *op, size_t index);
    size_t (*GetOutputTypeCount)(const struct OrtCustomOp *op);
    void (*KernelCompute)(void *op_kernel, OrtKernelContext *context);
    void (*KernelDestroy)(void *op_kernel);
    int (*GetInputCharacteristic)(const struct OrtCustomOp *op, size_t index);
    int (*GetOutputCharacteristic)(const struct OrtCustomOp *op, size_t index);
    int (*GetInputMemoryType)(const struct OrtCustomOp *op, size_t index);
    int (*GetVariadicInputMinArity)(const struct OrtCustomOp *op);
    int (*GetVariadicInputHomogeneity)(const struct OrtCustomOp *op);
    int (*GetVariadicOutputMinArity)(const struct OrtCustomOp *op);
    int (*GetVariadicOutputHomogeneity)(const struct OrtCustomOp *op);
    OrtStatus *(*CreateKernelV2)(const struct OrtCustomOp *op, const OrtApi *api, const OrtKernelInfo *info,
                                 void **kernel);
    OrtStatus *(*KernelComputeV2)(void *op_kernel, OrtKernelContext *context);
} OrtCustomOp;
#define EF_CUSTOM_OP_VERSION 16

/* OrtApi entries: (index, type). */
#define EF_API(api, index, type) ((type)(((void *const *)(api))[index]))
#define EF_CreateStatus(api) EF_API(api, 0, OrtStatus * (*)(int, const char *))
#define EF_CreateCustomOpDomain(api) EF_API(api, 26, OrtStatus * (*)(const char *, OrtCustomOpDomain **))
#define EF_CustomOpDomain_Add(api) EF_API(api, 27, OrtStatus * (*)(OrtCustomOpDomain *, const OrtCustomOp *))
#define EF_AddCustomOpDomain(api) EF_API(api, 28, OrtStatus * (*)(OrtSessionOptions *, OrtCustomOpDomain *))
#define EF_GetTensorMutableData(api) EF_API(api, 51, OrtStatus * (*)(OrtValue *, void **))
#define EF_GetDimensionsCount(api) EF_API(api, 61, OrtStatus * (*)(const OrtTensorTypeAndShapeInfo *, size_t *))
#define EF_GetDimensions(api) EF_API(api, 62, OrtStatus * (*)(const OrtTensorTypeAndShapeInfo *, int64_t *, size_t))
#define EF_GetTensorTypeAndShape(api) EF_API(api, 65, OrtStatus * (*)(const OrtValue *, OrtTensorTypeAndShapeInfo **))
#define EF_KernelInfoGetAttribute_int64(api) EF_API(api, 86, OrtStatus * (*)(const OrtKernelInfo *, const char *, int64_t *))
#define EF_KernelContext_GetInput(api) EF_API(api, 90, OrtStatus * (*)(const OrtKernelContext *, size_t, const OrtValue **))
#define EF_KernelContext_GetOutput(api) \
    EF_API(api, 91, OrtStatus * (*)(OrtKernelContext *, size_t, const int64_t *, size_t, OrtValue **))
#define EF_ReleaseStatus(api) EF_API(api, 93, void (*)(OrtStatus *))
#define EF_ReleaseTensorTypeAndShapeInfo(api) EF_API(api, 99, void (*)(OrtTensorTypeAndShapeInfo *))
#define EF_KernelContext_ParallelFor(api) \
    EF_API(api, 274, OrtStatus * (*)(const OrtKernelContext *, void (*)(void *, size_t), size_t, size_t, void *))

#endif
