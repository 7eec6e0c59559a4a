// Pixel kernels of Mira's worker: OpenSlide's BGRA to RGB with saturation, the 8-bit
// histogram and Otsu's threshold. CPU references: gpu-worker/src/kernels/cpu.rs.
// Compiled by NVRTC with --fmad=false, so float and double arithmetic rounds as on the CPU.

typedef unsigned char u8;
typedef unsigned long long u64;

__device__ __forceinline__ u8 saturation(unsigned r, unsigned g, unsigned b) {
    unsigned mx = max(r, max(g, b));
    unsigned mn = min(r, min(g, b));
    return mx == 0 ? 0 : (u8)(((mx - mn) * 255u + mx / 2u) / mx);
}

// Premultiplied BGRA composited over white: c + (255 - a), saturating.
extern "C" __global__ void bgra_to_rgb_sat(const u8* __restrict__ bgra, u8* __restrict__ rgb,
                                           u8* __restrict__ sat, u64 n) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        uchar4 p = reinterpret_cast<const uchar4*>(bgra)[i];
        unsigned bg = 255u - p.w;
        unsigned r = min(255u, p.z + bg), g = min(255u, p.y + bg), b = min(255u, p.x + bg);
        rgb[3 * i] = (u8)r;
        rgb[3 * i + 1] = (u8)g;
        rgb[3 * i + 2] = (u8)b;
        sat[i] = saturation(r, g, b);
    }
}

extern "C" __global__ void rgb_saturation(const u8* __restrict__ rgb, u8* __restrict__ sat, u64 n) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        sat[i] = saturation(rgb[3 * i], rgb[3 * i + 1], rgb[3 * i + 2]);
    }
}

// Per-block counts in shared memory, then one global add per bin and block.
extern "C" __global__ void histogram256(const u8* __restrict__ v, u64 n, u64* __restrict__ hist) {
    __shared__ unsigned int local[256];
    for (int b = threadIdx.x; b < 256; b += blockDim.x) local[b] = 0;
    __syncthreads();
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        atomicAdd(&local[v[i]], 1u);
    }
    __syncthreads();
    for (int b = threadIdx.x; b < 256; b += blockDim.x) {
        if (local[b]) atomicAdd(&hist[b], (u64)local[b]);
    }
}

// Otsu's threshold with skimage.filters.threshold_otsu's semantics (the span of values
// present, the first maximiser, foreground is > t). One thread: 256 bins are nothing, and
// doing the sums in the CPU's order keeps the result bit-identical. The arrays are shared
// memory: as locals they would make the driver reserve 8 KiB of local memory for every thread
// the device can hold, for the life of the context. Launched as one block of one thread.
extern "C" __global__ void otsu256(const u64* __restrict__ hist, int* __restrict__ out) {
    __shared__ double w1[256], m1[256], w2[256], m2[256];
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    int lo = -1, hi = -1;
    for (int i = 0; i < 256; i++) {
        if (hist[i]) {
            if (lo < 0) lo = i;
            hi = i;
        }
    }
    if (lo < 0) { *out = 0; return; }
    if (lo == hi) { *out = lo; return; }
    int n = hi - lo + 1;
    double cw = 0.0, cm = 0.0;
    for (int i = 0; i < n; i++) {
        double h = (double)hist[lo + i];
        cw += h;
        cm += h * (double)(lo + i);
        w1[i] = cw;
        m1[i] = cm / cw;
    }
    cw = 0.0; cm = 0.0;
    for (int i = n - 1; i >= 0; i--) {
        double h = (double)hist[lo + i];
        cw += h;
        cm += h * (double)(lo + i);
        w2[i] = cw;
        m2[i] = cm / cw;
    }
    double best = -1.0 / 0.0;
    int arg = 0;
    for (int i = 0; i < n - 1; i++) {
        double d = m1[i] - m2[i + 1];
        double v = w1[i] * w2[i + 1] * (d * d);
        if (v > best) { best = v; arg = i; }
    }
    *out = lo + arg;
}
