// Fused resize + crop + normalise + HWC->CHW (+ FP16) for images decoded on the host.
//
// The GPU path for images DALI cannot decode on the device, and for frames handed in as
// arrays. NumPy reference: kernels/reference.py (preprocess_reference), same conventions.
//
// Input:  one uint8 HWC image, 3 channels (RGB), rows `src_pitch` bytes apart.
// Output: the (3, S, S) view of batch item `batch_index` in an NCHW float16/float32
//         buffer, i.e. at element offset batch_index * 3 * S * S.
//
// Geometry (what Preprocess.resized_shape / crop_origin give): the image is resized to
// (resized_h, resized_w) and the S x S window at (top, left) is kept. Only the window is
// computed: output pixel (oy, ox) is pixel (top + oy, left + ox) of the resized image.
//
// Two resize conventions (`convention`), both separable, horizontal pass first:
//
// convention 0, OpenCV (cv2.resize; specs with antialias = false, e.g. the gender card).
// Output pixel (oy, ox) samples the source at
//     sy = (top + oy + 0.5) * src_h / resized_h - 0.5     (pixel-centre convention)
//     sx = (left + ox + 0.5) * src_w / resized_w - 0.5
// with clamp-to-edge borders (every tap index clamped into the image), and NO
// antialiasing: when shrinking, the filter is not widened. Filters (mode):
//   0 bilinear  2 taps
//   1 bicubic   4 taps, Keys kernel with parameter `cubic_a`: -0.75 is OpenCV's INTER_CUBIC
//               (what the Python side passes for this convention)
//   2 lanczos4  8 taps, sinc(t) sinc(t/4) normalised to sum 1 (OpenCV's INTER_LANCZOS4)
//
// convention 1, PIL (Image.resize with reducing_gap=None, Pillow's ImagingResample; specs
// with antialias = true, e.g. the quality card's timm transform). Per axis, with
// scale = src / resized, filterscale = max(scale, 1) and support = filter_support *
// filterscale, destination index d (top + oy, or left + ox) has
//     center = (d + 0.5) * scale
//     taps i in [max(int(center - support + 0.5), 0), min(int(center + support + 0.5), src))
//     weight(i) = filter((i - center + 0.5) / filterscale) / (sum of the weights)
// so the filter widens when shrinking (antialiasing) and taps outside the image are
// dropped (no clamping). The tap count is unbounded (~2 * support per axis); weights are
// computed on the fly, the first kPilCache x weights kept per thread. Filters (mode):
//   0 bilinear  filter_support 1, triangle
//   1 bicubic   filter_support 2, Keys kernel with `cubic_a` (-0.5 is PIL's, what the
//               Python side passes for this convention)
//   2 lanczos3  filter_support 3, sinc(t) sinc(t/3) (PIL's LANCZOS)
// The horizontal pass is clamped to [0, 255] before the vertical one, because PIL stores
// it as uint8 (clipped). PIL also rounds there and at the end, with fixed-point weights;
// this kernel does not round, so it differs from PIL by up to ~1 grey level (measured in
// tests/kernels/test_reference.py). The double-precision bounds can differ from PIL's by
// one tap only where that tap's weight is 0 (FMA contraction at an exact tie).
//
// In both, the interpolated value is clamped to [0, 255] (as a uint8 resize saturates)
// but not rounded, then normalised: out = (v / 255 - mean[c]) / std[c], with mean/std
// indexed by OUTPUT channel. swap_rb != 0 writes the channels in BGR order.
//
// One thread per output pixel, writing all 3 channels. Launch: block (16, 16), grid
// (ceil(S / 16), ceil(S / 16)).
//
// Batched form (preprocess_batch_*): one launch for a whole batch, grid.z = images. Image
// z's source is at `base + frames[z].offset` and its geometry is frames[z] (a FrameGeom,
// laid out as kernels/launch.py's FRAME_GEOM_DTYPE: 40 bytes); it writes batch item z.
// The filter, convention and normalisation are the view's, shared by the batch.

#include <cuda_fp16.h>

namespace {

constexpr int kMaxTaps = 8;

__device__ __forceinline__ float cubic_weight(float t, float a) {
    t = fabsf(t);
    if (t <= 1.0f) return ((a + 2.0f) * t - (a + 3.0f)) * t * t + 1.0f;
    if (t < 2.0f) return ((a * t - 5.0f * a) * t + 8.0f * a) * t - 4.0f * a;
    return 0.0f;
}

__device__ __forceinline__ float lanczos4_weight(float t) {
    if (fabsf(t) < 1e-6f) return 1.0f;
    const float pi = 3.14159265358979323846f;
    return 4.0f * sinpif(t) * sinpif(0.25f * t) / (pi * pi * t * t);
}

// -- OpenCV convention ------------------------------------------------------------------

// Tap positions and weights along one axis for destination index `dst`.
// Returns the number of taps; idx[] is already clamped to [0, n_src - 1].
// The source position is computed in double (two FLOPs per axis per pixel) so that it is
// exact to far below a pixel's 1/1000 even at 4K widths; the filter math is float.
__device__ __forceinline__ int axis_taps(int dst, int n_src, int n_resized, int mode, float cubic_a, int* idx,
                                         float* w) {
    const double s = ((double)dst + 0.5) * ((double)n_src / (double)n_resized) - 0.5;
    const double fl = floor(s);
    const float f = (float)(s - fl);
    const int i0 = (int)fl;
    int n;
    int first;
    if (mode == 0) {
        n = 2;
        first = i0;
        w[0] = 1.0f - f;
        w[1] = f;
    } else if (mode == 1) {
        n = 4;
        first = i0 - 1;
        w[0] = cubic_weight(f + 1.0f, cubic_a);
        w[1] = cubic_weight(f, cubic_a);
        w[2] = cubic_weight(1.0f - f, cubic_a);
        w[3] = cubic_weight(2.0f - f, cubic_a);
    } else {
        n = 8;
        first = i0 - 3;
        float sum = 0.0f;
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            w[k] = lanczos4_weight(f + 3.0f - (float)k);
            sum += w[k];
        }
        const float inv = 1.0f / sum;
#pragma unroll
        for (int k = 0; k < 8; ++k) w[k] *= inv;
    }
    for (int k = 0; k < n; ++k) idx[k] = min(max(first + k, 0), n_src - 1);
    return n;
}

// The resized pixel (dst_y, dst_x), OpenCV convention, not yet clamped.
__device__ __forceinline__ void opencv_pixel(const unsigned char* __restrict__ src, int src_h, int src_w,
                                             int src_pitch, int resized_h, int resized_w, int dst_y, int dst_x,
                                             int mode, float cubic_a, float* acc) {
    int xi[kMaxTaps], yi[kMaxTaps];
    float wx[kMaxTaps], wy[kMaxTaps];
    const int nx = axis_taps(dst_x, src_w, resized_w, mode, cubic_a, xi, wx);
    const int ny = axis_taps(dst_y, src_h, resized_h, mode, cubic_a, yi, wy);

    float acc0 = 0.0f, acc1 = 0.0f, acc2 = 0.0f;
    for (int j = 0; j < ny; ++j) {
        const unsigned char* row = src + (size_t)yi[j] * (size_t)src_pitch;
        float r0 = 0.0f, r1 = 0.0f, r2 = 0.0f;
        for (int i = 0; i < nx; ++i) {
            const unsigned char* p = row + 3 * xi[i];
            r0 += wx[i] * (float)p[0];
            r1 += wx[i] * (float)p[1];
            r2 += wx[i] * (float)p[2];
        }
        acc0 += wy[j] * r0;
        acc1 += wy[j] * r1;
        acc2 += wy[j] * r2;
    }
    acc[0] = acc0;
    acc[1] = acc1;
    acc[2] = acc2;
}

// -- PIL convention ---------------------------------------------------------------------

constexpr int kPilCache = 32;  // x weights a thread keeps; taps beyond are recomputed per row

__device__ __forceinline__ float lanczos3_weight(float t) {
    if (fabsf(t) < 1e-6f) return 1.0f;
    if (t < -3.0f || t >= 3.0f) return 0.0f;
    const float pi = 3.14159265358979323846f;
    return 3.0f * sinpif(t) * sinpif(t * (1.0f / 3.0f)) / (pi * pi * t * t);
}

__device__ __forceinline__ float pil_weight(float t, int mode, float cubic_a) {
    if (mode == 0) return fmaxf(1.0f - fabsf(t), 0.0f);
    if (mode == 1) return cubic_weight(t, cubic_a);
    return lanczos3_weight(t);
}

// The taps of one destination index along one axis: source indices first .. first+count-1
// (all inside the image), tap k at filter argument t0 + k * step (not yet normalised).
struct PilAxis {
    int first;
    int count;
    float t0;
    float step;
};

// Bounds in double with PIL's own arithmetic and C truncation (precompute_coeffs).
__device__ __forceinline__ PilAxis pil_axis(int dst, int n_src, int n_resized, int mode) {
    const double scale = (double)n_src / (double)n_resized;
    const double filterscale = scale > 1.0 ? scale : 1.0;
    const double support = (mode == 0 ? 1.0 : mode == 1 ? 2.0 : 3.0) * filterscale;
    const double center = ((double)dst + 0.5) * scale;
    const int lo = max((int)(center - support + 0.5), 0);
    const int hi = min((int)(center + support + 0.5), n_src);
    PilAxis a;
    a.first = lo;
    a.count = hi - lo;
    a.t0 = (float)(((double)lo - center + 0.5) / filterscale);
    a.step = (float)(1.0 / filterscale);
    return a;
}

__device__ __forceinline__ float pil_tap(const PilAxis& a, int k, int mode, float cubic_a) {
    return pil_weight(fmaf((float)k, a.step, a.t0), mode, cubic_a);
}

// The resized pixel (dst_y, dst_x), PIL convention, not yet clamped (its horizontal pass is).
__device__ __forceinline__ void pil_pixel(const unsigned char* __restrict__ src, int src_h, int src_w,
                                          int src_pitch, int resized_h, int resized_w, int dst_y, int dst_x,
                                          int mode, float cubic_a, float* acc) {
    const PilAxis ax = pil_axis(dst_x, src_w, resized_w, mode);
    const PilAxis ay = pil_axis(dst_y, src_h, resized_h, mode);

    // First loop: the weight sums (PIL normalises each axis's weights to sum 1). The sum
    // is > 0: the tap nearest the centre is always inside and weighs >= 1/2.
    float wxc[kPilCache];
    float sum_x = 0.0f;
    for (int i = 0; i < ax.count; ++i) {
        const float w = pil_tap(ax, i, mode, cubic_a);
        if (i < kPilCache) wxc[i] = w;
        sum_x += w;
    }
    float sum_y = 0.0f;
    for (int j = 0; j < ay.count; ++j) sum_y += pil_tap(ay, j, mode, cubic_a);
    const float inv_x = 1.0f / sum_x;
    const float inv_y = 1.0f / sum_y;

    // Second loop: horizontal pass per source row (clamped as PIL's uint8 clips it), then
    // the vertical sum.
    float acc0 = 0.0f, acc1 = 0.0f, acc2 = 0.0f;
    for (int j = 0; j < ay.count; ++j) {
        const unsigned char* row = src + (size_t)(ay.first + j) * (size_t)src_pitch + 3 * (size_t)ax.first;
        float r0 = 0.0f, r1 = 0.0f, r2 = 0.0f;
        for (int i = 0; i < ax.count; ++i) {
            const float w = i < kPilCache ? wxc[i] : pil_tap(ax, i, mode, cubic_a);
            const unsigned char* p = row + 3 * i;
            r0 += w * (float)p[0];
            r1 += w * (float)p[1];
            r2 += w * (float)p[2];
        }
        const float wy = pil_tap(ay, j, mode, cubic_a);
        acc0 += wy * fminf(fmaxf(r0 * inv_x, 0.0f), 255.0f);
        acc1 += wy * fminf(fmaxf(r1 * inv_x, 0.0f), 255.0f);
        acc2 += wy * fminf(fmaxf(r2 * inv_x, 0.0f), 255.0f);
    }
    acc[0] = acc0 * inv_y;
    acc[1] = acc1 * inv_y;
    acc[2] = acc2 * inv_y;
}

// -- output -------------------------------------------------------------------------------

__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }

template <typename OutT>
__device__ void preprocess_impl(const unsigned char* __restrict__ src, int src_h, int src_w, int src_pitch,
                                int resized_h, int resized_w, int top, int left, int out_size, int mode,
                                int convention, float cubic_a, int swap_rb, float mean0, float mean1, float mean2,
                                float std0, float std1, float std2, OutT* __restrict__ out, int batch_index) {
    const int ox = blockIdx.x * blockDim.x + threadIdx.x;
    const int oy = blockIdx.y * blockDim.y + threadIdx.y;
    if (ox >= out_size || oy >= out_size) return;

    float acc[3];
    if (convention == 1)
        pil_pixel(src, src_h, src_w, src_pitch, resized_h, resized_w, top + oy, left + ox, mode, cubic_a, acc);
    else
        opencv_pixel(src, src_h, src_w, src_pitch, resized_h, resized_w, top + oy, left + ox, mode, cubic_a, acc);
    float acc0 = acc[0], acc1 = acc[1], acc2 = acc[2];
    acc0 = fminf(fmaxf(acc0, 0.0f), 255.0f);
    acc1 = fminf(fmaxf(acc1, 0.0f), 255.0f);
    acc2 = fminf(fmaxf(acc2, 0.0f), 255.0f);
    if (swap_rb) {
        const float t = acc0;
        acc0 = acc2;
        acc2 = t;
    }
    const size_t plane = (size_t)out_size * (size_t)out_size;
    OutT* o = out + (size_t)batch_index * 3 * plane + (size_t)oy * out_size + ox;
    const float inv255 = 1.0f / 255.0f;
    store(o, (acc0 * inv255 - mean0) / std0);
    store(o + plane, (acc1 * inv255 - mean1) / std1);
    store(o + 2 * plane, (acc2 * inv255 - mean2) / std2);
}

}  // namespace

// Per-image geometry of the batched form. Keep in step with FRAME_GEOM_DTYPE.
struct FrameGeom {
    long long offset;  // bytes from `base` to the image's first row
    int src_h, src_w, src_pitch;
    int resized_h, resized_w, top, left;
    int reserved;  // pads the struct to 40 bytes (8-byte aligned)
};

// The entry points (signatures written out: kernels/launch.py packs arguments for them
// and a CPU test checks its packing against these declarations).
extern "C" __global__ void preprocess_u8_to_f32(const unsigned char* __restrict__ src, int src_h, int src_w,
                                                int src_pitch, int resized_h, int resized_w, int top, int left,
                                                int out_size, int mode, int convention, float cubic_a,
                                                int swap_rb, float mean0, float mean1, float mean2, float std0,
                                                float std1, float std2, float* __restrict__ out,
                                                int batch_index) {
    preprocess_impl<float>(src, src_h, src_w, src_pitch, resized_h, resized_w, top, left, out_size, mode,
                           convention, cubic_a, swap_rb, mean0, mean1, mean2, std0, std1, std2, out, batch_index);
}

extern "C" __global__ void preprocess_u8_to_f16(const unsigned char* __restrict__ src, int src_h, int src_w,
                                                int src_pitch, int resized_h, int resized_w, int top, int left,
                                                int out_size, int mode, int convention, float cubic_a,
                                                int swap_rb, float mean0, float mean1, float mean2, float std0,
                                                float std1, float std2, __half* __restrict__ out,
                                                int batch_index) {
    preprocess_impl<__half>(src, src_h, src_w, src_pitch, resized_h, resized_w, top, left, out_size, mode,
                            convention, cubic_a, swap_rb, mean0, mean1, mean2, std0, std1, std2, out,
                            batch_index);
}

template <typename OutT>
__device__ void preprocess_batch_impl(const unsigned char* __restrict__ base, const FrameGeom* __restrict__ frames,
                                      int out_size, int mode, int convention, float cubic_a, int swap_rb,
                                      float mean0, float mean1, float mean2, float std0, float std1, float std2,
                                      OutT* __restrict__ out) {
    const FrameGeom g = frames[blockIdx.z];
    preprocess_impl<OutT>(base + g.offset, g.src_h, g.src_w, g.src_pitch, g.resized_h, g.resized_w, g.top, g.left,
                          out_size, mode, convention, cubic_a, swap_rb, mean0, mean1, mean2, std0, std1, std2, out,
                          (int)blockIdx.z);
}

extern "C" __global__ void preprocess_batch_u8_to_f32(const unsigned char* __restrict__ base,
                                                      const FrameGeom* __restrict__ frames, int out_size, int mode,
                                                      int convention, float cubic_a, int swap_rb, float mean0,
                                                      float mean1, float mean2, float std0, float std1, float std2,
                                                      float* __restrict__ out) {
    preprocess_batch_impl<float>(base, frames, out_size, mode, convention, cubic_a, swap_rb, mean0, mean1, mean2,
                                 std0, std1, std2, out);
}

extern "C" __global__ void preprocess_batch_u8_to_f16(const unsigned char* __restrict__ base,
                                                      const FrameGeom* __restrict__ frames, int out_size, int mode,
                                                      int convention, float cubic_a, int swap_rb, float mean0,
                                                      float mean1, float mean2, float std0, float std1, float std2,
                                                      __half* __restrict__ out) {
    preprocess_batch_impl<__half>(base, frames, out_size, mode, convention, cubic_a, swap_rb, mean0, mean1, mean2,
                                  std0, std1, std2, out);
}
