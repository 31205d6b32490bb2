// Fused softmax + argmax over a (rows, classes) buffer, so only the probabilities and
// one int32 per row travel back to the host.
//
// NumPy reference: kernels/reference.py (postprocess_reference); engine/postprocess.py
// is the CPU path it must agree with.
//
// Input:  contiguous row-major (rows, classes) logits, float32 or float16.
// Output: probabilities (rows, classes) float32, argmax (rows,) int32.
// probabilities_input != 0: the model already outputs probabilities; they are copied
//         (converted to float32) and only the argmax is computed.
//
// One warp per row (lanes stride over the classes, so any class count works; up to a
// few thousand it stays a handful of loads per lane). Launch: block (32 * kRowsPerBlock)
// = 128 threads (4 rows per block), grid ceil(rows / 4).
//
// Argmax is taken over the input (softmax is monotone), ties go to the lowest index as
// numpy.argmax. NaN never wins a comparison (numpy.argmax would pick the first NaN, so
// the argmax of a row holding NaN is unspecified); a row with a NaN or +inf logit gets NaN
// probabilities in logits mode, so the host's finiteness check on the probabilities still
// catches it.

#include <cuda_fp16.h>

namespace {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float load(const float* p) { return *p; }
__device__ __forceinline__ float load(const __half* p) { return __half2float(*p); }

template <typename InT>
__device__ void softmax_argmax_impl(const InT* __restrict__ in, float* __restrict__ probs,
                                    int* __restrict__ argmax, int rows, int classes, int probabilities_input) {
    const int lane = threadIdx.x % kWarp;
    const int row = blockIdx.x * (blockDim.x / kWarp) + threadIdx.x / kWarp;
    if (row >= rows) return;  // whole warp leaves together: row is uniform across the warp
    const InT* x = in + (size_t)row * classes;
    float* p = probs + (size_t)row * classes;

    // Pass 1: max and its lowest index (NaN never compares greater).
    float best = -INFINITY;
    int best_i = classes;  // "none yet"; any real index beats it
    for (int c = lane; c < classes; c += kWarp) {
        const float v = load(x + c);
        if (v > best || (v == best && c < best_i)) {
            best = v;
            best_i = c;
        }
    }
#pragma unroll
    for (int off = kWarp / 2; off > 0; off /= 2) {
        const float ov = __shfl_xor_sync(kFullMask, best, off);
        const int oi = __shfl_xor_sync(kFullMask, best_i, off);
        if (ov > best || (ov == best && oi < best_i)) {
            best = ov;
            best_i = oi;
        }
    }
    if (best_i >= classes) best_i = 0;  // every input NaN: the row's probabilities are NaN anyway
    if (lane == 0) argmax[row] = best_i;

    if (probabilities_input) {
        for (int c = lane; c < classes; c += kWarp) p[c] = load(x + c);
        return;
    }

    // Pass 2: sum of exp(x - max) with the row max from pass 1 (NaN-blind). A NaN logit
    // makes its exp NaN, a +inf one makes inf - inf = NaN: the sum, and so every
    // probability of the row, becomes NaN.
    float sum = 0.0f;
    for (int c = lane; c < classes; c += kWarp) sum += expf(load(x + c) - best);
#pragma unroll
    for (int off = kWarp / 2; off > 0; off /= 2) sum += __shfl_xor_sync(kFullMask, sum, off);
    const float inv = 1.0f / sum;

    // Pass 3: write.
    for (int c = lane; c < classes; c += kWarp) p[c] = expf(load(x + c) - best) * inv;
}

}  // namespace

extern "C" __global__ void softmax_argmax_f32(const float* __restrict__ in, float* __restrict__ probs,
                                              int* __restrict__ argmax, int rows, int classes,
                                              int probabilities_input) {
    softmax_argmax_impl<float>(in, probs, argmax, rows, classes, probabilities_input);
}

extern "C" __global__ void softmax_argmax_f16(const __half* __restrict__ in, float* __restrict__ probs,
                                              int* __restrict__ argmax, int rows, int classes,
                                              int probabilities_input) {
    softmax_argmax_impl<__half>(in, probs, argmax, rows, classes, probabilities_input);
}
