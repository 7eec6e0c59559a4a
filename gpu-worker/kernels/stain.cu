// Stain kernels: optical density and the Macenko statistics (the sums behind the covariance,
// the angle histogram, the concentration histograms), and applying Macenko or Reinhard
// normalisation. CPU references: gpu-worker/src/kernels/cpu.rs. The optical density comes
// from the same 256-entry table on both paths; with --fmad=false the float arithmetic rounds
// as on the CPU, and only expf, atan2f, powf and cbrtf may differ in the last place.

typedef unsigned char u8;
typedef unsigned long long u64;

#define BLOCK 256

// params: [0] n, [1..4] sum of OD, [4..10] sum of OD*OD^T (xx xy xz yy yz zz). The block
// reduction assumes exactly BLOCK threads (gpu.rs launches every kernel with 256).
extern "C" __global__ void __launch_bounds__(BLOCK) od_sums(const u8* __restrict__ rgb, u64 n, const float* __restrict__ od,
                                   double beta, double* __restrict__ out) {
    double s[10] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        float x = od[rgb[3 * i]], y = od[rgb[3 * i + 1]], z = od[rgb[3 * i + 2]];
        if ((double)x < beta || (double)y < beta || (double)z < beta) continue;
        double dx = x, dy = y, dz = z;
        s[0] += 1.0;
        s[1] += dx; s[2] += dy; s[3] += dz;
        s[4] += dx * dx; s[5] += dx * dy; s[6] += dx * dz;
        s[7] += dy * dy; s[8] += dy * dz; s[9] += dz * dz;
    }
    __shared__ double part[BLOCK];
    for (int k = 0; k < 10; k++) {
        part[threadIdx.x] = s[k];
        __syncthreads();
        for (int step = blockDim.x / 2; step > 0; step >>= 1) {
            if (threadIdx.x < step) part[threadIdx.x] += part[threadIdx.x + step];
            __syncthreads();
        }
        if (threadIdx.x == 0) atomicAdd(&out[k], part[0]);
        __syncthreads();
    }
}

// e: the plane's two vectors e1 (0..3) and e2 (3..6); bin = (phi + pi) * scale, clamped.
extern "C" __global__ void angle_histogram(const u8* __restrict__ rgb, u64 n, const float* __restrict__ od,
                                           double beta, const float* __restrict__ e, float pi, float scale,
                                           u64* __restrict__ hist, int bins) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        float a = od[rgb[3 * i]], b = od[rgb[3 * i + 1]], c = od[rgb[3 * i + 2]];
        if ((double)a < beta || (double)b < beta || (double)c < beta) continue;
        float x = a * e[0] + b * e[1] + c * e[2];
        float y = a * e[3] + b * e[4] + c * e[5];
        long long bin = (long long)((atan2f(y, x) + pi) * scale);
        bin = bin < 0 ? 0 : (bin >= bins ? bins - 1 : bin);
        atomicAdd(&hist[bin], 1ULL);
    }
}

// pinv: 2x3 row-major; hist: hematoxylin bins then eosin bins, bin = floor((c - lo) * scale).
extern "C" __global__ void concentration_histogram(const u8* __restrict__ rgb, u64 n, const float* __restrict__ od,
                                                   const float* __restrict__ pinv, float lo, float scale,
                                                   u64* __restrict__ hist, int bins) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        float a = od[rgb[3 * i]], b = od[rgb[3 * i + 1]], c = od[rgb[3 * i + 2]];
        for (int s = 0; s < 2; s++) {
            float v = pinv[3 * s] * a + pinv[3 * s + 1] * b + pinv[3 * s + 2] * c;
            float f = floorf((v - lo) * scale);
            long long bin = isnan(f) ? 0 : (long long)fmaxf(fminf(f, (float)(bins - 1)), 0.0f);
            atomicAdd(&hist[s * bins + bin], 1ULL);
        }
    }
}

__device__ __forceinline__ u8 to_u8(float v) {
    return v >= 255.0f ? 255 : (v > 0.0f ? (u8)v : 0);
}

// m: 3x3 row-major, OD' = m * OD; out = min(255, io * exp(-OD')) truncated.
extern "C" __global__ void macenko_apply(u8* __restrict__ rgb, u64 n, const float* __restrict__ od,
                                         const float* __restrict__ m, float io) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        float a = od[rgb[3 * i]], b = od[rgb[3 * i + 1]], c = od[rgb[3 * i + 2]];
        for (int ch = 0; ch < 3; ch++) {
            float v = m[3 * ch] * a + m[3 * ch + 1] * b + m[3 * ch + 2] * c;
            rgb[3 * i + ch] = to_u8(io * expf(-v));
        }
    }
}

// p: [0..9] rgb2xyz, [9..18] xyz2rgb, [18..21] white point, [21..24] k, [24..27] d.
extern "C" __global__ void reinhard_apply(u8* __restrict__ rgb, u64 n, const float* __restrict__ p) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        float c[3];
        for (int ch = 0; ch < 3; ch++) {
            float v = rgb[3 * i + ch] / 255.0f;
            c[ch] = v > 0.04045f ? powf((v + 0.055f) / 1.055f, 2.4f) : v / 12.92f;
        }
        float f[3];
        for (int r = 0; r < 3; r++) {
            float v = (p[3 * r] * c[0] + p[3 * r + 1] * c[1] + p[3 * r + 2] * c[2]) / p[18 + r];
            f[r] = v > 0.008856f ? cbrtf(v) : 7.787f * v + 16.0f / 116.0f;
        }
        float lab[3] = {116.0f * f[1] - 16.0f, 500.0f * (f[0] - f[1]), 200.0f * (f[1] - f[2])};
        for (int r = 0; r < 3; r++) lab[r] = lab[r] * p[21 + r] + p[24 + r];
        float y = (lab[0] + 16.0f) / 116.0f;
        float x = lab[1] / 500.0f + y;
        float z = y - lab[2] / 200.0f;
        float g[3] = {x, y, z};
        for (int r = 0; r < 3; r++) {
            float v = g[r];
            g[r] = (v > 0.2068966f ? v * v * v : (v - 16.0f / 116.0f) / 7.787f) * p[18 + r];
        }
        for (int ch = 0; ch < 3; ch++) {
            float l = p[9 + 3 * ch] * g[0] + p[9 + 3 * ch + 1] * g[1] + p[9 + 3 * ch + 2] * g[2];
            float s = l > 0.0031308f ? 1.055f * powf(l, 1.0f / 2.4f) - 0.055f : l * 12.92f;
            s = fminf(fmaxf(s, 0.0f), 1.0f);
            rgb[3 * i + ch] = to_u8(s * 255.0f);
        }
    }
}
