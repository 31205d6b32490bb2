// Force-included (g++ -include shim.h) ahead of a kernel source compiled as host C++, so
// that the unmodified .cu file builds and runs on the CPU. Used by harness.cpp; see
// tests/kernels/test_host_emulation.py for what this does and does not check.
//
// It provides only what the kernels in kernels/*.cu use. Anything else (shared memory,
// __syncthreads, atomics, other intrinsics) is deliberately missing, so a kernel that
// starts using it fails this build loudly instead of running on a guessed stand-in.
#pragma once

// The toolkit's own fp16 header is host-includable: without __CUDACC__ it defines
// __host__/__device__/__global__ as empty annotations and __forceinline__ as an inline
// attribute, and its __half conversions take their software path (round to nearest
// even, the same result as the device's cvt.rn.f16.f32). Including it first means the
// kernels' own #include <cuda_fp16.h> is a no-op and __half is NVIDIA's type, not ours.
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

// Only in case a future toolkit header stops defining them on the host path.
#ifndef __global__
#define __global__
#endif
#ifndef __device__
#define __device__
#endif
#ifndef __host__
#define __host__
#endif
#ifndef __forceinline__
#define __forceinline__ inline __attribute__((always_inline))
#endif

// CUDA's device runtime has int and float min/max overloads in the global namespace.
using std::max;
using std::min;

// The built-in variables. The harness sets them before it runs (or resumes) each
// emulated thread; thread_local so that launches made from different host threads do
// not see each other's. The types are CUDA's own (vector_types.h), so expressions like
// blockIdx.x * blockDim.x + threadIdx.x keep their unsigned arithmetic.
inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;
constexpr int warpSize = 32;

// sinpif(x) = sin(pi * x), which host libm lacks. CUDA documents it as exact at
// integers (+-0) and NaN at infinities; naive sin(M_PI * x) is not zero at integers,
// which would put tiny non-zero Lanczos weights where the device has none. So reduce
// exactly first: r = x - 2 * round(x / 2) is exact in double for every float (floats of
// magnitude >= 2^24 are even integers and give 0), then fold r into [-1/2, 1/2] with
// sin(pi r) = sin(pi (+-1 - r)), and evaluate in double before rounding to float.
inline float sinpif(float x) {
    if (!std::isfinite(x)) return NAN;
    double r = (double)x - 2.0 * std::nearbyint((double)x * 0.5);  // in [-1, 1]
    if (r > 0.5) r = 1.0 - r;
    else if (r < -0.5) r = -1.0 - r;
    if (r == 0.0) return std::copysign(0.0f, x);
    return (float)std::sin(M_PI * r);
}

namespace emu {
// Defined in harness.cpp: the calling lane hands its 64-bit payload to the warp and
// gets back lane `src_lane`'s, once every live lane of the warp has called it.
std::uint64_t warp_exchange(unsigned mask, std::uint64_t bits, unsigned size, int src_lane);

// Lane index as CUDA numbers threads: linear thread id (x fastest, then y, z) mod 32.
inline int lane_id() {
    const unsigned linear = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    return (int)(linear % (unsigned)warpSize);
}
}  // namespace emu

// __shfl_xor_sync with the documented semantics: lane l reads `var` of lane
// l ^ laneMask; with width < 32 a lane whose partner lies in a later group of `width`
// lanes gets its own value back. All live lanes must reach the same call (the harness
// reports a shuffle that some lanes skip, which is undefined on the device).
template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int laneMask, int width = warpSize) {
    static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffle of an unsupported type");
    const int lane = emu::lane_id();
    int src = lane ^ laneMask;
    if (src >= (lane / width + 1) * width) src = lane;
    std::uint64_t bits = 0;
    std::memcpy(&bits, &var, sizeof(T));
    bits = emu::warp_exchange(mask, bits, sizeof(T), src);
    T out;
    std::memcpy(&out, &bits, sizeof(T));
    return out;
}
