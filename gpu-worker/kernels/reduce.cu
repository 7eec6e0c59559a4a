// The 2x downsample of the DeepZoom pyramid: a separable filter with per-output taps
// (Lanczos-3 weights as Pillow computes them, 22-bit fixed point). Integer arithmetic, so
// the result is bit-identical to the CPU's (gpu-worker/src/deepzoom.rs, Reduce2).

typedef unsigned char u8;
#define PRECISION_BITS 22

__device__ __forceinline__ u8 clip(long long acc) {
    long long v = acc >> PRECISION_BITS;
    return (u8)(v < 0 ? 0 : (v > 255 ? 255 : v));
}

// One thread per (row, output pixel): out[y][i] = sum_k w[start_i + k] * src[y][lo_i + k].
extern "C" __global__ void reduce_rows(const u8* __restrict__ src, int in_w, int rows,
                                       const int* __restrict__ lo, const int* __restrict__ start,
                                       const int* __restrict__ count, const int* __restrict__ w,
                                       u8* __restrict__ out, int out_w) {
    long long total = (long long)rows * out_w;
    for (long long t = blockIdx.x * (long long)blockDim.x + threadIdx.x; t < total;
         t += (long long)gridDim.x * blockDim.x) {
        int y = (int)(t / out_w), i = (int)(t % out_w);
        long long a0 = 1LL << (PRECISION_BITS - 1), a1 = a0, a2 = a0;
        const u8* s = src + ((long long)y * in_w + lo[i]) * 3;
        const int* k = w + start[i];
        for (int j = 0; j < count[i]; j++) {
            long long kw = k[j];
            a0 += s[3 * j] * kw;
            a1 += s[3 * j + 1] * kw;
            a2 += s[3 * j + 2] * kw;
        }
        u8* o = out + ((long long)y * out_w + i) * 3;
        o[0] = clip(a0);
        o[1] = clip(a1);
        o[2] = clip(a2);
    }
}

// One thread per (output row j, byte b): out[j][b] = sum_k w[start_i + k] * src[lo_i + k - src_first][b]
// with i = first_out + j; rows are `stride` bytes.
extern "C" __global__ void reduce_columns(const u8* __restrict__ src, int stride, int src_first,
                                          int first_out, int n_out,
                                          const int* __restrict__ lo, const int* __restrict__ start,
                                          const int* __restrict__ count, const int* __restrict__ w,
                                          u8* __restrict__ out) {
    long long total = (long long)n_out * stride;
    for (long long t = blockIdx.x * (long long)blockDim.x + threadIdx.x; t < total;
         t += (long long)gridDim.x * blockDim.x) {
        int j = (int)(t / stride), b = (int)(t % stride);
        int i = first_out + j;
        long long acc = 1LL << (PRECISION_BITS - 1);
        const u8* s = src + (long long)(lo[i] - src_first) * stride + b;
        const int* k = w + start[i];
        for (int q = 0; q < count[i]; q++) acc += s[(long long)q * stride] * (long long)k[q];
        out[t] = clip(acc);
    }
}
