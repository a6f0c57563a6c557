"""CUDA C for GGUF's quantized blocks: the device functions `leank.kernels.tl_gemv`'s TileLang kernels
call, and a host build of the same decoders for tests on machines without a GPU.

Decoding follows gguf-py's dequantizers operation for operation in float32 (d * q, (d * sc) * q - dmin * m,
(d * sc) * q), so decoded weights equal gguf-py's bit for bit (every product that precedes an addition is
exact, so contracting it into an FMA changes nothing).

A unit (what one thread decodes) is a whole block of the 32-weight types or a quarter of a 256-weight
K-quant super-block; its weights are runs of 16 consecutive weights whose codes sit in 16 consecutive
bytes of the block. `TYPES` gives, per type, the block's size in weights and bytes, units per block and
the alignment its byte runs may assume (blocks of 18, 22, 34 or 210 bytes are only 2-byte aligned).
No TileLang here: tests compile `host_source` with nvcc's host compiler where nvcc exists.
"""

# GGML type name -> (weights per block, bytes per block, units per block, byte-run alignment)
TYPES = {
    "Q4_0": (32, 18, 1, 2), "Q4_1": (32, 20, 1, 4), "Q5_0": (32, 22, 1, 2), "Q5_1": (32, 24, 1, 8),
    "Q8_0": (32, 34, 1, 2), "Q4_K": (256, 144, 4, 16), "Q5_K": (256, 176, 4, 16), "Q6_K": (256, 210, 4, 2),
}
C_TYPES = {"float32": "float", "float16": "half", "bfloat16": "__nv_bfloat16"}

COMMON = r"""
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>
#include <string.h>

namespace leank_q {

// host and device: the decoders also compile for the host, where tests check them against gguf-py
#define LEANK_HD __host__ __device__ __forceinline__
#ifdef __CUDA_ARCH__
#define LEANK_LDG(p) __ldg(p)
#else
#define LEANK_LDG(p) (*(p))
#endif

LEANK_HD float bits2f(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f; memcpy(&f, &u, 4); return f;
#endif
}
LEANK_HD float h2f(uint32_t bits16) { __half_raw r; r.x = (unsigned short)bits16; return __half2float(__half(r)); }
// an integer code below 2^23 as float, exactly, without an int -> float conversion
LEANK_HD float u2f(uint32_t q) { return bits2f(0x4B000000u | q) - 8388608.0f; }

// 16 consecutive bytes at p (aligned to A bytes) as four little-endian words
template <int A> LEANK_HD void ld16(const uint8_t* p, uint32_t* w);
template <> LEANK_HD void ld16<16>(const uint8_t* p, uint32_t* w) {
  uint4 v = LEANK_LDG(reinterpret_cast<const uint4*>(p)); w[0] = v.x; w[1] = v.y; w[2] = v.z; w[3] = v.w;
}
template <> LEANK_HD void ld16<8>(const uint8_t* p, uint32_t* w) {
  uint2 a = LEANK_LDG(reinterpret_cast<const uint2*>(p)), b = LEANK_LDG(reinterpret_cast<const uint2*>(p + 8));
  w[0] = a.x; w[1] = a.y; w[2] = b.x; w[3] = b.y;
}
template <> LEANK_HD void ld16<4>(const uint8_t* p, uint32_t* w) {
  const uint32_t* q = reinterpret_cast<const uint32_t*>(p);
#pragma unroll
  for (int i = 0; i < 4; i++) w[i] = LEANK_LDG(q + i);
}
template <> LEANK_HD void ld16<2>(const uint8_t* p, uint32_t* w) {
  const unsigned short* q = reinterpret_cast<const unsigned short*>(p);
#pragma unroll
  for (int i = 0; i < 4; i++) w[i] = (uint32_t)LEANK_LDG(q + 2 * i) | ((uint32_t)LEANK_LDG(q + 2 * i + 1) << 16);
}
LEANK_HD uint32_t ld_u16(const uint8_t* p) { return LEANK_LDG(reinterpret_cast<const unsigned short*>(p)); }
LEANK_HD uint32_t byte_of(const uint32_t* w, int i) { return (w[i >> 2] >> (8 * (i & 3))) & 0xFFu; }

// K-quants' 6-bit scale and min of sub-block j (0..7) from the 12 packed bytes at s
LEANK_HD void scale_min_k4(const uint8_t* s, int j, uint32_t& sc, uint32_t& m) {
  if (j < 4) {
    sc = s[j] & 63u; m = s[j + 4] & 63u;
  } else {
    sc = (s[j + 4] & 0xFu) | ((s[j - 4] >> 6) << 4);
    m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

// Each decoder writes the unit's weights w[16 r + i] (run r, i < 16) and the runs' first weight index
// within the block, start[r].

LEANK_HD void dec_Q4_0(const uint8_t* b, int u, float* w, int* start) {
  float d = h2f(ld_u16(b));
  uint32_t q[4]; ld16<2>(b + 2, q);
#pragma unroll
  for (int i = 0; i < 16; i++) {
    uint32_t c = byte_of(q, i);
    w[i] = d * (u2f(c & 0xFu) - 8.0f);
    w[16 + i] = d * (u2f(c >> 4) - 8.0f);
  }
  start[0] = 0; start[1] = 16;
}

LEANK_HD void dec_Q4_1(const uint8_t* b, int u, float* w, int* start) {
  float d = h2f(ld_u16(b)), m = h2f(ld_u16(b + 2));
  uint32_t q[4]; ld16<4>(b + 4, q);
#pragma unroll
  for (int i = 0; i < 16; i++) {
    uint32_t c = byte_of(q, i);
    w[i] = d * u2f(c & 0xFu) + m;
    w[16 + i] = d * u2f(c >> 4) + m;
  }
  start[0] = 0; start[1] = 16;
}

LEANK_HD void dec_Q5_0(const uint8_t* b, int u, float* w, int* start) {
  float d = h2f(ld_u16(b));
  uint32_t qh = ld_u16(b + 2) | (ld_u16(b + 4) << 16);
  uint32_t q[4]; ld16<2>(b + 6, q);
#pragma unroll
  for (int i = 0; i < 16; i++) {
    uint32_t c = byte_of(q, i);
    w[i] = d * (u2f((c & 0xFu) | (((qh >> i) & 1u) << 4)) - 16.0f);
    w[16 + i] = d * (u2f((c >> 4) | (((qh >> (i + 16)) & 1u) << 4)) - 16.0f);
  }
  start[0] = 0; start[1] = 16;
}

LEANK_HD void dec_Q5_1(const uint8_t* b, int u, float* w, int* start) {
  float d = h2f(ld_u16(b)), m = h2f(ld_u16(b + 2));
  uint32_t qh = LEANK_LDG(reinterpret_cast<const uint32_t*>(b + 4));
  uint32_t q[4]; ld16<8>(b + 8, q);
#pragma unroll
  for (int i = 0; i < 16; i++) {
    uint32_t c = byte_of(q, i);
    w[i] = d * u2f((c & 0xFu) | (((qh >> i) & 1u) << 4)) + m;
    w[16 + i] = d * u2f((c >> 4) | (((qh >> (i + 16)) & 1u) << 4)) + m;
  }
  start[0] = 0; start[1] = 16;
}

LEANK_HD void dec_Q8_0(const uint8_t* b, int u, float* w, int* start) {
  float d = h2f(ld_u16(b));
  uint32_t q[8]; ld16<2>(b + 2, q); ld16<2>(b + 18, q + 4);
#pragma unroll
  for (int i = 0; i < 32; i++) w[i] = d * (float)(int8_t)byte_of(q, i);
  start[0] = 0; start[1] = 16;
}

// Q4_K unit u: weights 64u .. 64u + 63 (sub-blocks 2u and 2u + 1: low and high nibbles of qs[32u ..])
LEANK_HD void dec_Q4_K(const uint8_t* b, int u, float* w, int* start) {
  float d = h2f(ld_u16(b)), dmin = h2f(ld_u16(b + 2));
  uint32_t s1, m1, s2, m2;
  scale_min_k4(b + 4, 2 * u, s1, m1);
  scale_min_k4(b + 4, 2 * u + 1, s2, m2);
  float d1 = d * u2f(s1), dm1 = dmin * u2f(m1), d2 = d * u2f(s2), dm2 = dmin * u2f(m2);
  uint32_t q[8]; ld16<16>(b + 16 + 32 * u, q); ld16<16>(b + 32 + 32 * u, q + 4);
#pragma unroll
  for (int i = 0; i < 32; i++) {
    uint32_t c = byte_of(q, i);
    w[i] = d1 * u2f(c & 0xFu) - dm1;
    w[32 + i] = d2 * u2f(c >> 4) - dm2;
  }
  start[0] = 64 * u; start[1] = 64 * u + 16; start[2] = 64 * u + 32; start[3] = 64 * u + 48;
}

// Q5_K unit u: as Q4_K, the fifth bit of weight 64u + 32h + l in bit 2u + h of qh[l]
LEANK_HD void dec_Q5_K(const uint8_t* b, int u, float* w, int* start) {
  float d = h2f(ld_u16(b)), dmin = h2f(ld_u16(b + 2));
  uint32_t s1, m1, s2, m2;
  scale_min_k4(b + 4, 2 * u, s1, m1);
  scale_min_k4(b + 4, 2 * u + 1, s2, m2);
  float d1 = d * u2f(s1), dm1 = dmin * u2f(m1), d2 = d * u2f(s2), dm2 = dmin * u2f(m2);
  uint32_t h[8]; ld16<16>(b + 16, h); ld16<16>(b + 32, h + 4);
  uint32_t q[8]; ld16<16>(b + 48 + 32 * u, q); ld16<16>(b + 64 + 32 * u, q + 4);
#pragma unroll
  for (int i = 0; i < 32; i++) {
    uint32_t c = byte_of(q, i), hb = byte_of(h, i);
    w[i] = d1 * u2f((c & 0xFu) | (((hb >> (2 * u)) & 1u) << 4)) - dm1;
    w[32 + i] = d2 * u2f((c >> 4) | (((hb >> (2 * u + 1)) & 1u) << 4)) - dm2;
  }
  start[0] = 64 * u; start[1] = 64 * u + 16; start[2] = 64 * u + 32; start[3] = 64 * u + 48;
}

// Q6_K unit u = 2 hh + lh: weights 128 hh + 32 r + 16 lh + i (r < 4, i < 16)
LEANK_HD void dec_Q6_K(const uint8_t* b, int u, float* w, int* start) {
  const int hh = u >> 1, lh = u & 1;
  float d = h2f(ld_u16(b + 208));
  const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192) + 8 * hh + lh;
  uint32_t lo[4], hi[4], qh[4];
  ld16<2>(b + 64 * hh + 16 * lh, lo);
  ld16<2>(b + 64 * hh + 32 + 16 * lh, hi);
  ld16<2>(b + 128 + 32 * hh + 16 * lh, qh);
  float ds[4];
#pragma unroll
  for (int r = 0; r < 4; r++) ds[r] = d * (float)sc[2 * r];
#pragma unroll
  for (int i = 0; i < 16; i++) {
    uint32_t a = byte_of(lo, i), c = byte_of(hi, i), h = byte_of(qh, i);
    w[i] = ds[0] * (u2f((a & 0xFu) | ((h & 3u) << 4)) - 32.0f);
    w[16 + i] = ds[1] * (u2f((c & 0xFu) | (((h >> 2) & 3u) << 4)) - 32.0f);
    w[32 + i] = ds[2] * (u2f((a >> 4) | (((h >> 4) & 3u) << 4)) - 32.0f);
    w[48 + i] = ds[3] * (u2f((c >> 4) | (((h >> 6) & 3u) << 4)) - 32.0f);
  }
#pragma unroll
  for (int r = 0; r < 4; r++) start[r] = 128 * hh + 32 * r + 16 * lh;
}

// 8 consecutive activations (16-byte aligned) as float
LEANK_HD void x8(const half* p, float* f) {
  uint4 v = *reinterpret_cast<const uint4*>(p);
  uint32_t u[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; i++) { f[2 * i] = h2f(u[i] & 0xFFFFu); f[2 * i + 1] = h2f(u[i] >> 16); }
}
LEANK_HD void x8(const __nv_bfloat16* p, float* f) {
  uint4 v = *reinterpret_cast<const uint4*>(p);
  uint32_t u[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; i++) { f[2 * i] = bits2f(u[i] << 16); f[2 * i + 1] = bits2f(u[i] & 0xFFFF0000u); }
}

// 8 floats stored as the output type (16- or 32-byte aligned)
LEANK_HD void st8(float* p, const float* f) {
  reinterpret_cast<float4*>(p)[0] = make_float4(f[0], f[1], f[2], f[3]);
  reinterpret_cast<float4*>(p)[1] = make_float4(f[4], f[5], f[6], f[7]);
}
LEANK_HD void st8(half* p, const float* f) {
  half h[8];
#pragma unroll
  for (int i = 0; i < 8; i++) h[i] = __float2half_rn(f[i]);
  *reinterpret_cast<uint4*>(p) = *reinterpret_cast<uint4*>(h);
}
LEANK_HD void st8(__nv_bfloat16* p, const float* f) {
  __nv_bfloat16 h[8];
#pragma unroll
  for (int i = 0; i < 8; i++) h[i] = __float2bfloat16_rn(f[i]);
  *reinterpret_cast<uint4*>(p) = *reinterpret_cast<uint4*>(h);
}
LEANK_HD void st1(float* p, float v) { *p = v; }
LEANK_HD float ld1(const float* p) { return *p; }
LEANK_HD float ld1(const half* p) { return __half2float(*p); }
LEANK_HD float ld1(const __nv_bfloat16* p) { return __bfloat162float(*p); }
// v rounded to the type of the tag pointer (as torch stores a float result in a half-precision tensor)
LEANK_HD float round_as(float v, const float*) { return v; }
LEANK_HD float round_as(float v, const half*) { return __half2float(__float2half_rn(v)); }
LEANK_HD float round_as(float v, const __nv_bfloat16*) { return __bfloat162float(__float2bfloat16_rn(v)); }
// float arithmetic rounded at every step, never contracted into an FMA (torch's elementwise kernels)
LEANK_HD float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  volatile float r = a * b; return r;
#endif
}
LEANK_HD float add_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  volatile float r = a + b; return r;
#endif
}
LEANK_HD float sub_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fsub_rn(a, b);
#else
  volatile float r = a - b; return r;
#endif
}
LEANK_HD void st1(half* p, float v) { *p = __float2half_rn(v); }
LEANK_HD void st1(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

}  // namespace leank_q
"""

CODES = r"""
namespace leank_q {

// dp4a: four signed byte products summed into c; vsub4: bytewise a - b (no borrow between bytes)
LEANK_HD int dp4a(int a, int b, int c) {
#ifdef __CUDA_ARCH__
  return __dp4a(a, b, c);
#else
  for (int i = 0; i < 4; i++) c += (int)(int8_t)(a >> (8 * i)) * (int)(int8_t)(b >> (8 * i));
  return c;
#endif
}
LEANK_HD uint32_t vsub4(uint32_t a, uint32_t b) {
#ifdef __CUDA_ARCH__
  return __vsub4(a, b);
#else
  uint32_t r = 0;
  for (int i = 0; i < 4; i++) r |= (((a >> (8 * i)) - (b >> (8 * i))) & 0xFFu) << (8 * i);
  return r;
#endif
}
// 4 bits b0..b3 -> bit 4 of bytes 0..3
LEANK_HD uint32_t spread4(uint32_t bits) { return ((bits & 0xFu) * 0x00204081u & 0x01010101u) << 4; }

// Activations quantized to 8 bits per group of 32 (scale amax / 127, codes rint(x / scale)), in pieces of 8
// consecutive values: the step kernels give each piece to a lane and share the group's maximum by shuffles
// (`STEP`); here a loop does. v -> codes at xq (8-byte aligned).
LEANK_HD float piece_amax(const float* v) {
  float a = 0.0f;
#pragma unroll
  for (int i = 0; i < 8; i++) a = fmaxf(a, fabsf(v[i]));
  return a;
}
LEANK_HD void quant_piece(const float* v, float amax, int8_t* xq) {
  const float d = amax / 127.0f, id = d > 0.0f ? 1.0f / d : 0.0f;
  uint32_t w[2] = {0u, 0u};
#pragma unroll
  for (int i = 0; i < 8; i++) w[i >> 2] |= ((uint32_t)(int)rintf(v[i] * id) & 0xFFu) << (8 * (i & 3));
  *reinterpret_cast<uint2*>(xq) = make_uint2(w[0], w[1]);
}
// a whole group: 32 values v -> 32 codes at xq, their scale at *xd
LEANK_HD void quant_32(const float* v, int8_t* xq, float* xd) {
  float amax = 0.0f;
#pragma unroll
  for (int p = 0; p < 4; p++) amax = fmaxf(amax, piece_amax(v + 8 * p));
#pragma unroll
  for (int p = 0; p < 4; p++) quant_piece(v + 8 * p, amax, xq + 8 * p);
  *xd = amax / 127.0f;
}

// group g of the flattened (M, K) rows -> xq[32 g .. 32 g + 31], xd[g]
template <typename XT> LEANK_HD void quant_x_group(const XT* x, int8_t* xq, float* xd, int g) {
  float v[32];
#pragma unroll
  for (int i = 0; i < 4; i++) x8(x + 32 * (size_t)g + 8 * i, v + 8 * i);
  quant_32(v, xq + 32 * (size_t)g, xd + g);
}

// Each codes_ function gives a unit's weights as signed byte codes, 4 to a word, 16 to a run (cw[4 r ..
// 4 r + 3]), and per run r: its first weight's index in the block (xoff), the factor of sum(code * xq)
// (rs) and of sum(xq) (rm: minimums; 0 without), so that the run's dot product with activations of
// scale dx is dx * (rs * sum(code * xq) + rm * sum(xq)).

LEANK_HD void codes_Q4_0(const uint8_t* b, int u, int* cw, float* rs, float* rm, int* xoff) {
  const float d = h2f(ld_u16(b));
  uint32_t q[4]; ld16<2>(b + 2, q);
#pragma unroll
  for (int j = 0; j < 4; j++) {
    cw[j] = (int)vsub4(q[j] & 0x0F0F0F0Fu, 0x08080808u);
    cw[4 + j] = (int)vsub4((q[j] >> 4) & 0x0F0F0F0Fu, 0x08080808u);
  }
  rs[0] = rs[1] = d; rm[0] = rm[1] = 0.0f; xoff[0] = 0; xoff[1] = 16;
}

LEANK_HD void codes_Q4_1(const uint8_t* b, int u, int* cw, float* rs, float* rm, int* xoff) {
  const float d = h2f(ld_u16(b)), m = h2f(ld_u16(b + 2));
  uint32_t q[4]; ld16<4>(b + 4, q);
#pragma unroll
  for (int j = 0; j < 4; j++) { cw[j] = (int)(q[j] & 0x0F0F0F0Fu); cw[4 + j] = (int)((q[j] >> 4) & 0x0F0F0F0Fu); }
  rs[0] = rs[1] = d; rm[0] = rm[1] = m; xoff[0] = 0; xoff[1] = 16;
}

LEANK_HD void codes_Q5_0(const uint8_t* b, int u, int* cw, float* rs, float* rm, int* xoff) {
  const float d = h2f(ld_u16(b));
  const uint32_t qh = ld_u16(b + 2) | (ld_u16(b + 4) << 16);
  uint32_t q[4]; ld16<2>(b + 6, q);
#pragma unroll
  for (int j = 0; j < 4; j++) {
    cw[j] = (int)vsub4((q[j] & 0x0F0F0F0Fu) | spread4(qh >> (4 * j)), 0x10101010u);
    cw[4 + j] = (int)vsub4(((q[j] >> 4) & 0x0F0F0F0Fu) | spread4(qh >> (16 + 4 * j)), 0x10101010u);
  }
  rs[0] = rs[1] = d; rm[0] = rm[1] = 0.0f; xoff[0] = 0; xoff[1] = 16;
}

LEANK_HD void codes_Q5_1(const uint8_t* b, int u, int* cw, float* rs, float* rm, int* xoff) {
  const float d = h2f(ld_u16(b)), m = h2f(ld_u16(b + 2));
  const uint32_t qh = LEANK_LDG(reinterpret_cast<const uint32_t*>(b + 4));
  uint32_t q[4]; ld16<8>(b + 8, q);
#pragma unroll
  for (int j = 0; j < 4; j++) {
    cw[j] = (int)((q[j] & 0x0F0F0F0Fu) | spread4(qh >> (4 * j)));
    cw[4 + j] = (int)(((q[j] >> 4) & 0x0F0F0F0Fu) | spread4(qh >> (16 + 4 * j)));
  }
  rs[0] = rs[1] = d; rm[0] = rm[1] = m; xoff[0] = 0; xoff[1] = 16;
}

LEANK_HD void codes_Q8_0(const uint8_t* b, int u, int* cw, float* rs, float* rm, int* xoff) {
  const float d = h2f(ld_u16(b));
  uint32_t q[8]; ld16<2>(b + 2, q); ld16<2>(b + 18, q + 4);
#pragma unroll
  for (int j = 0; j < 8; j++) cw[j] = (int)q[j];
  rs[0] = rs[1] = d; rm[0] = rm[1] = 0.0f; xoff[0] = 0; xoff[1] = 16;
}

// the 12 scale bytes of a K-quant block as words, and sub-block j's 6-bit scale and min
LEANK_HD void scale_min_k4w(const uint32_t* s, int j, uint32_t& sc, uint32_t& m) {
  if (j < 4) {
    sc = byte_of(s, j) & 63u; m = byte_of(s, j + 4) & 63u;
  } else {
    sc = (byte_of(s, j + 4) & 0xFu) | ((byte_of(s, j - 4) >> 6) << 4);
    m = (byte_of(s, j + 4) >> 4) | ((byte_of(s, j) >> 6) << 4);
  }
}

LEANK_HD void k4_header(const uint8_t* b, int u, float* rs, float* rm, int* xoff) {
  uint4 h = LEANK_LDG(reinterpret_cast<const uint4*>(b));  // d, dmin, scales[12]
  const float d = h2f(h.x & 0xFFFFu), dmin = h2f(h.x >> 16);
  const uint32_t s[3] = {h.y, h.z, h.w};
  uint32_t s1, m1, s2, m2;
  scale_min_k4w(s, 2 * u, s1, m1);
  scale_min_k4w(s, 2 * u + 1, s2, m2);
  rs[0] = rs[1] = d * u2f(s1); rm[0] = rm[1] = -(dmin * u2f(m1));
  rs[2] = rs[3] = d * u2f(s2); rm[2] = rm[3] = -(dmin * u2f(m2));
#pragma unroll
  for (int r = 0; r < 4; r++) xoff[r] = 64 * u + 16 * r;
}

LEANK_HD void codes_Q4_K(const uint8_t* b, int u, int* cw, float* rs, float* rm, int* xoff) {
  k4_header(b, u, rs, rm, xoff);
  uint32_t q[8]; ld16<16>(b + 16 + 32 * u, q); ld16<16>(b + 32 + 32 * u, q + 4);
#pragma unroll
  for (int j = 0; j < 8; j++) { cw[j] = (int)(q[j] & 0x0F0F0F0Fu); cw[8 + j] = (int)((q[j] >> 4) & 0x0F0F0F0Fu); }
}

LEANK_HD void codes_Q5_K(const uint8_t* b, int u, int* cw, float* rs, float* rm, int* xoff) {
  k4_header(b, u, rs, rm, xoff);
  uint32_t h[8]; ld16<16>(b + 16, h); ld16<16>(b + 32, h + 4);
  uint32_t q[8]; ld16<16>(b + 48 + 32 * u, q); ld16<16>(b + 64 + 32 * u, q + 4);
#pragma unroll
  for (int j = 0; j < 8; j++) {
    cw[j] = (int)((q[j] & 0x0F0F0F0Fu) | (((h[j] >> (2 * u)) & 0x01010101u) << 4));
    cw[8 + j] = (int)(((q[j] >> 4) & 0x0F0F0F0Fu) | (((h[j] >> (2 * u + 1)) & 0x01010101u) << 4));
  }
}

LEANK_HD void codes_Q6_K(const uint8_t* b, int u, int* cw, float* rs, float* rm, int* xoff) {
  const int hh = u >> 1, lh = u & 1;
  const float d = h2f(ld_u16(b + 208));
  uint32_t lo[4], hi[4], qh[4], sw[4];
  ld16<2>(b + 64 * hh + 16 * lh, lo);
  ld16<2>(b + 64 * hh + 32 + 16 * lh, hi);
  ld16<2>(b + 128 + 32 * hh + 16 * lh, qh);
  ld16<2>(b + 192, sw);
#pragma unroll
  for (int j = 0; j < 4; j++) {
    cw[j] = (int)vsub4((lo[j] & 0x0F0F0F0Fu) | ((qh[j] & 0x03030303u) << 4), 0x20202020u);
    cw[4 + j] = (int)vsub4((hi[j] & 0x0F0F0F0Fu) | (((qh[j] >> 2) & 0x03030303u) << 4), 0x20202020u);
    cw[8 + j] = (int)vsub4(((lo[j] >> 4) & 0x0F0F0F0Fu) | (((qh[j] >> 4) & 0x03030303u) << 4), 0x20202020u);
    cw[12 + j] = (int)vsub4(((hi[j] >> 4) & 0x0F0F0F0Fu) | (((qh[j] >> 6) & 0x03030303u) << 4), 0x20202020u);
  }
#pragma unroll
  for (int r = 0; r < 4; r++) {
    rs[r] = d * (float)(int8_t)byte_of(sw, 8 * hh + 2 * r + lh);
    rm[r] = 0.0f;
    xoff[r] = 128 * hh + 32 * r + 16 * lh;
  }
}

}  // namespace leank_q
"""

GEMV = r"""
// the dot products of one unit's codes with activation rows t < m: acc[t] += ...
LEANK_HD void {name}_acc(const int* cw, const float* rs, const float* rm, const int* xoff, int blk, const int8_t* xq,
                         const float* xd, int m, int K, float* acc) {{
  using namespace leank_q;
#pragma unroll
  for (int t = 0; t < {maxm}; t++) {{
    if (t < m) {{
      const int8_t* xb = xq + (size_t)t * K + blk * {qk};
      const float* db = xd + (size_t)t * (K / 32) + blk * ({qk} / 32);
      float s = 0.0f;
#pragma unroll
      for (int r = 0; r < {runs}; r++) {{
        const uint4 xv = *reinterpret_cast<const uint4*>(xb + xoff[r]);
        const int xw[4] = {{(int)xv.x, (int)xv.y, (int)xv.z, (int)xv.w}};
        int is = 0;
#pragma unroll
        for (int j = 0; j < 4; j++) is = dp4a(cw[4 * r + j], xw[j], is);
        float f = rs[r] * (float)is;
        if ({has_min}) {{
          int xs = 0;
#pragma unroll
          for (int j = 0; j < 4; j++) xs = dp4a(0x01010101, xw[j], xs);
          f = fmaf(rm[r], (float)xs, f);
        }}
        s = fmaf(db[xoff[r] >> 5], f, s);
      }}
      acc[t] += s;
    }}
  }}
}}

// lane `lane`'s share of row `row`: acc[t] = sum over the lane's units of xq[t] . W[row] (t < m <= MAXM),
// activations quantized by quant_x_group (xq codes, xd scales per 32). Two units at a time: both units'
// loads are issued before either's arithmetic (twice the bytes in flight per lane), summed in unit order.
LEANK_HD void {name}_lane(const void* wp, const int8_t* xq, const float* xd, int m, int K, int row_bytes, int row,
                          int lane, float* acc) {{
  using namespace leank_q;
  const uint8_t* wr = reinterpret_cast<const uint8_t*>(wp) + (size_t)row * row_bytes;
  const int n_units = (K / {qk}) * {upb};
#pragma unroll
  for (int t = 0; t < {maxm}; t++) acc[t] = 0.0f;
  int u = lane;
  for (; u + 32 < n_units; u += 64) {{
    const int ba = u / {upb}, bb = (u + 32) / {upb};
    int cwa[4 * {runs}], xoa[{runs}], cwb[4 * {runs}], xob[{runs}];
    float rsa[{runs}], rma[{runs}], rsb[{runs}], rmb[{runs}];
    codes_{tname}(wr + (size_t)ba * {bytes}, u % {upb}, cwa, rsa, rma, xoa);
    codes_{tname}(wr + (size_t)bb * {bytes}, (u + 32) % {upb}, cwb, rsb, rmb, xob);
    {name}_acc(cwa, rsa, rma, xoa, ba, xq, xd, m, K, acc);
    {name}_acc(cwb, rsb, rmb, xob, bb, xq, xd, m, K, acc);
  }}
  if (u < n_units) {{
    const int blk = u / {upb};
    int cw[4 * {runs}], xoff[{runs}];
    float rs[{runs}], rm[{runs}];
    codes_{tname}(wr + (size_t)blk * {bytes}, u % {upb}, cw, rs, rm, xoff);
    {name}_acc(cw, rs, rm, xoff, blk, xq, xd, m, K, acc);
  }}
}}

#ifdef __CUDACC__
// y[t * ldy + col0 + row] = r[t * ldr + col0 + row] (if add) + xq[t] . W[row] for t < m: one warp per row,
// lanes summed by shuffles. r: a residual (ldr = ldy) or a bias (ldr = 0)
__device__ __forceinline__ void {name}(const void* wp, const void* xqp, const void* xdp, void* yp, const void* rp,
                                        int n_rows, int m, int K, int row_bytes, int ldy, int ldr, int add, int col0,
                                        int row, int lane) {{
  using namespace leank_q;
  if (row >= n_rows) return;
  float acc[{maxm}];
  {name}_lane(wp, reinterpret_cast<const int8_t*>(xqp), reinterpret_cast<const float*>(xdp), m, K, row_bytes, row,
              lane, acc);
  {yt}* y = reinterpret_cast<{yt}*>(yp);
  const {yt}* r = reinterpret_cast<const {yt}*>(rp);
#pragma unroll
  for (int t = 0; t < {maxm}; t++) {{
    if (t < m) {{
      float v = acc[t];
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
      if (lane == 0) st1(y + (size_t)t * ldy + col0 + row, add ? ld1(r + (size_t)t * ldr + col0 + row) + v : v);
    }}
  }}
}}
#endif
"""

# One activation row (a decode step of one sequence): each warp takes {nr} consecutive weight rows, so that a
# unit's activation codes, their sums and scale are loaded once for all of them (they were loaded once per
# row: as many bytes as the weights' own, through the same load units), and the rows' loads are in flight
# together. Each row's sum runs unit by unit as in {name}_lane, so it equals that row's lane sums bit for bit.
GEMV1 = r"""
LEANK_HD void {name}_rows(const void* wp, const int8_t* xq, const float* xd, int K, int row_bytes, int n_rows,
                          int row0, int lane, float* acc) {{
  using namespace leank_q;
  const int n_units = (K / {qk}) * {upb};
  const uint8_t* wr[{nr}];
#pragma unroll
  for (int j = 0; j < {nr}; j++) {{
    acc[j] = 0.0f;  // rows past the matrix read its last row (never stored)
    wr[j] = reinterpret_cast<const uint8_t*>(wp) + (size_t)(row0 + j < n_rows ? row0 + j : n_rows - 1) * row_bytes;
  }}
  for (int u = lane; u < n_units; u += 32) {{
    const int blk = u / {upb};
    int cw[{nr}][4 * {runs}], xoff[{runs}];
    float rs[{nr}][{runs}], rm[{nr}][{runs}], s[{nr}];
#pragma unroll
    for (int j = 0; j < {nr}; j++) {{
      codes_{tname}(wr[j] + (size_t)blk * {bytes}, u % {upb}, cw[j], rs[j], rm[j], xoff);
      s[j] = 0.0f;
    }}
    const int8_t* xb = xq + blk * {qk};
    const float* db = xd + blk * ({qk} / 32);
#pragma unroll
    for (int r = 0; r < {runs}; r++) {{
      const uint4 xv = *reinterpret_cast<const uint4*>(xb + xoff[r]);
      const int xw[4] = {{(int)xv.x, (int)xv.y, (int)xv.z, (int)xv.w}};
      int xs = 0;
      if ({has_min}) {{
#pragma unroll
        for (int q = 0; q < 4; q++) xs = dp4a(0x01010101, xw[q], xs);
      }}
      const float dx = db[xoff[r] >> 5];
#pragma unroll
      for (int j = 0; j < {nr}; j++) {{
        int is = 0;
#pragma unroll
        for (int q = 0; q < 4; q++) is = dp4a(cw[j][4 * r + q], xw[q], is);
        float f = rs[j][r] * (float)is;
        if ({has_min}) f = fmaf(rm[j][r], (float)xs, f);
        s[j] = fmaf(dx, f, s[j]);
      }}
    }}
#pragma unroll
    for (int j = 0; j < {nr}; j++) acc[j] += s[j];
  }}
}}

#ifdef __CUDACC__
// y[col0 + row] = r[col0 + row] (if add) + xq . W[row] for the warp's {nr} rows; lanes summed by shuffles
__device__ __forceinline__ void {name}(const void* wp, const void* xqp, const void* xdp, void* yp, const void* rp,
                                        int n_rows, int K, int row_bytes, int add, int col0, int warp, int lane) {{
  using namespace leank_q;
  const int row0 = warp * {nr};
  if (row0 >= n_rows) return;
  float acc[{nr}];
  {name}_rows(wp, reinterpret_cast<const int8_t*>(xqp), reinterpret_cast<const float*>(xdp), K, row_bytes, n_rows,
              row0, lane, acc);
  {yt}* y = reinterpret_cast<{yt}*>(yp) + col0 + row0;
  const {yt}* r = reinterpret_cast<const {yt}*>(rp) + col0 + row0;
#pragma unroll
  for (int j = 0; j < {nr}; j++) {{
    float v = acc[j];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
    if (lane == j && row0 + j < n_rows) st1(y + j, add ? ld1(r + j) + v : v);
  }}
}}
#endif
"""

GEMV1_HOST = r"""
// the one-row kernel's sums, as the device adds them: each row's lane partials in butterfly order
extern "C" void {prefix}_gemv1(const void* w, const int8_t* xq, const float* xd, float* y, int n_rows, int K,
                               int row_bytes) {{
  for (int row0 = 0; row0 < n_rows; row0 += {nr}) {{
    float part[32][{nr}];
    for (int lane = 0; lane < 32; lane++) {gemv1}_rows(w, xq, xd, K, row_bytes, n_rows, row0, lane, part[lane]);
    for (int j = 0; j < {nr} && row0 + j < n_rows; j++) {{
      float v[32], nv[32];
      for (int l = 0; l < 32; l++) v[l] = part[l][j];
      for (int o = 16; o > 0; o >>= 1) {{
        for (int l = 0; l < 32; l++) nv[l] = v[l] + v[l ^ o];
        for (int l = 0; l < 32; l++) v[l] = nv[l];
      }}
      y[row0 + j] = v[0];
    }}
  }}
}}
"""

QUANT_X = r"""
LEANK_HD void {name}(const void* xp, void* xqp, void* xdp, int n_groups, int g) {{
  if (g < n_groups)
    leank_q::quant_x_group(reinterpret_cast<const {xt}*>(xp), reinterpret_cast<int8_t*>(xqp),
                           reinterpret_cast<float*>(xdp), g);
}}
"""

# The small operations of a decode step around the matrices, one kernel each instead of torch's four to ten
# (`leank.kernels.tl_gemv`): RMSNorm straight into the 8-bit activations the next gemv reads, SiLU(gate) * up
# likewise, and RoPE of q and k from the projected rows. Each rounds where torch's unfused ops round (the
# compute dtype after the norm, after SiLU, after the product, after the rotation).
STEP = r"""
namespace leank_q {{

// The step kernels work in pieces of 8 consecutive activations (`piece_amax`, `quant_piece`), 4 lanes to a
// group of 32.
// x * rstd * w, rounded to XT as torch stores the norm's output
template <typename XT> LEANK_HD void norm_piece(const XT* x, const float* w, float rstd, float* v) {{
  x8(x, v);
#pragma unroll
  for (int i = 0; i < 8; i++) v[i] = round_as(mul_rn(mul_rn(v[i], rstd), w[i]), x);
}}
// SiLU(gate) * up, each rounded to XT as the unfused ops round
template <typename XT> LEANK_HD void silu_piece(const XT* gate, const XT* up, float* v) {{
  float b[8];
  x8(gate, v);
  x8(up, b);
#pragma unroll
  for (int i = 0; i < 8; i++) v[i] = round_as(mul_rn(round_as(v[i] / (1.0f + expf(-v[i])), gate), b[i]), gate);
}}

// RoPE of pair p of head h of row t: qkv (M, ld) rows hold q heads then k heads (then v), D channels each;
// neox pairs (p, p + D/2), interleaved (2p, 2p + 1); cos/sin (positions, D/2) float32 at the row's position.
// i runs over M x (Hq + Hkv) x D/2; q heads go to q (M, Hq, D), k heads to k (M, Hkv, D).
template <typename XT> LEANK_HD void rope_pair(const XT* qkv, const int64_t* pos, const float* cs, const float* sn,
                                               XT* q, XT* k, int Hq, int Hkv, int D, int ld, int neox, int i) {{
  const int half = D / 2, H = Hq + Hkv;
  const int t = i / (H * half), h = (i / half) % H, p = i % half;
  const int a = neox ? p : 2 * p, b = neox ? p + half : 2 * p + 1;
  const XT* x = qkv + (size_t)t * ld + h * D;
  const float x0 = ld1(x + a), x1 = ld1(x + b);
  const size_t at = (size_t)pos[t] * half + p;
  const float c = cs[at], s = sn[at];
  const float o0 = sub_rn(mul_rn(x0, c), mul_rn(x1, s)), o1 = add_rn(mul_rn(x0, s), mul_rn(x1, c));
  XT* o = h < Hq ? q + ((size_t)t * Hq + h) * D : k + ((size_t)t * Hkv + h - Hq) * D;
  st1(o + a, o0);
  st1(o + b, o1);
}}

}}  // namespace leank_q

// rope_qk: one thread per pair
LEANK_HD void {rope}(const void* qkv, const void* pos, const void* cs, const void* sn, void* q, void* k, int Hq,
                     int Hkv, int D, int ld, int neox, int n, int i) {{
  if (i < n)
    leank_q::rope_pair(reinterpret_cast<const {xt}*>(qkv), reinterpret_cast<const int64_t*>(pos),
                       reinterpret_cast<const float*>(cs), reinterpret_cast<const float*>(sn),
                       reinterpret_cast<{xt}*>(q), reinterpret_cast<{xt}*>(k), Hq, Hkv, D, ld, neox, i);
}}
#ifdef __CUDACC__
// a piece's group maximum: the 4 lanes of a group are consecutive lanes of one warp (every lane calls this)
__device__ __forceinline__ float group_amax(const float* v) {{
  float a = leank_q::piece_amax(v);
  a = fmaxf(a, __shfl_xor_sync(0xFFFFFFFFu, a, 1));
  return fmaxf(a, __shfl_xor_sync(0xFFFFFFFFu, a, 2));
}}

// silu_mul_qx: thread i takes piece i of h = SiLU(gate) * up over the flattened (M, F) rows of gu = (gate | up)
__device__ __forceinline__ void {silu}(const void* gup, void* xqp, void* xdp, int F, int n_pieces, int i) {{
  using namespace leank_q;
  const int ppr = F / 8, row = i / ppr, c = 8 * (i % ppr);
  const bool ok = i < n_pieces;
  float v[8] = {{0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f}};
  const {xt}* gate = reinterpret_cast<const {xt}*>(gup) + (size_t)row * 2 * F + c;
  if (ok) silu_piece(gate, gate + F, v);
  const float amax = group_amax(v);
  if (ok) {{
    quant_piece(v, amax, reinterpret_cast<int8_t*>(xqp) + (size_t)row * F + c);
    if ((c & 31) == 0) reinterpret_cast<float*>(xdp)[(size_t)row * (F / 32) + c / 32] = amax / 127.0f;
  }}
}}

// rmsnorm_qx: one block of NT threads per row, a piece of 8 activations per thread at a time: the row's sum
// of squares, then every piece normalized and quantized
#define NT {nt}
__device__ __forceinline__ void {norm}(const void* xp, const void* wp, void* xqp, void* xdp, int K, float eps, int row,
                                        int tx) {{
  using namespace leank_q;
  const {xt}* x = reinterpret_cast<const {xt}*>(xp) + (size_t)row * K;
  const float* w = reinterpret_cast<const float*>(wp);
  float ss = 0.0f;
  for (int i = 8 * tx; i < K; i += 8 * NT) {{
    float v[8];
    x8(x + i, v);
#pragma unroll
    for (int j = 0; j < 8; j++) ss = fmaf(v[j], v[j], ss);
  }}
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xFFFFFFFFu, ss, o);
  __shared__ float part[NT / 32];
  if ((tx & 31) == 0) part[tx >> 5] = ss;
  __syncthreads();
  float total = 0.0f;
#pragma unroll
  for (int j = 0; j < NT / 32; j++) total += part[j];
  const float rstd = rsqrtf(total / (float)K + eps);
  for (int base = 0; base < K; base += 8 * NT) {{  // the same trips for every thread: the shuffles need all lanes
    const int i = base + 8 * tx;
    const bool ok = i < K;
    float v[8] = {{0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f}};
    if (ok) norm_piece(x + i, w + i, rstd, v);
    const float amax = group_amax(v);
    if (ok) {{
      quant_piece(v, amax, reinterpret_cast<int8_t*>(xqp) + (size_t)row * K + i);
      if ((i & 31) == 0) reinterpret_cast<float*>(xdp)[(size_t)row * (K / 32) + i / 32] = amax / 127.0f;
    }}
  }}
}}
#undef NT
#endif
"""

STEP_HOST = r"""
// host twins of the step kernels (the norm's sum in piece order: the device's differs in its last bits)
extern "C" void leank_host_rmsnorm_qx(const void* xp, const float* w, int8_t* xq, float* xd, int M, int K, float eps) {{
  using namespace leank_q;
  const {xt}* x = reinterpret_cast<const {xt}*>(xp);
  for (int t = 0; t < M; t++) {{
    const {xt}* xr = x + (size_t)t * K;
    float ss = 0.0f, v[32];
    for (int i = 0; i < K; i += 8) {{
      x8(xr + i, v);
      for (int j = 0; j < 8; j++) ss = fmaf(v[j], v[j], ss);
    }}
    const float rstd = 1.0f / sqrtf(ss / (float)K + eps);
    for (int g = 0; g < K / 32; g++) {{  // a group as the device's 4 lanes take it, piece by piece
      for (int p = 0; p < 4; p++) norm_piece(xr + 32 * g + 8 * p, w + 32 * g + 8 * p, rstd, v + 8 * p);
      quant_32(v, xq + (size_t)t * K + 32 * g, xd + (size_t)t * (K / 32) + g);
    }}
  }}
}}
extern "C" void leank_host_silu_mul_qx(const void* gup, int8_t* xq, float* xd, int M, int F) {{
  using namespace leank_q;
  const {xt}* gu = reinterpret_cast<const {xt}*>(gup);
  float v[32];
  for (int t = 0; t < M; t++)
    for (int g = 0; g < F / 32; g++) {{
      const {xt}* gate = gu + (size_t)t * 2 * F + 32 * g;
      for (int p = 0; p < 4; p++) silu_piece(gate + 8 * p, gate + F + 8 * p, v + 8 * p);
      quant_32(v, xq + (size_t)t * F + 32 * g, xd + (size_t)t * (F / 32) + g);
    }}
}}
extern "C" void leank_host_rope_qk(const void* qkv, const int64_t* pos, const float* cs, const float* sn, void* q, void* k,
                                   int M, int Hq, int Hkv, int D, int ld, int neox) {{
  const int n = M * (Hq + Hkv) * (D / 2);
  for (int i = 0; i < n; i++) {rope}(qkv, pos, cs, sn, q, k, Hq, Hkv, D, ld, neox, n, i);
}}
"""

DEQ = r"""
// out[r, :] = W[ids[r], :] decoded, one unit per thread
LEANK_HD void {name}(const void* wp, const void* idp, void* op, int K, int row_bytes, int r, int u) {{
  using namespace leank_q;
  const int n_units = (K / {qk}) * {upb};
  if (u >= n_units) return;
  const int row = reinterpret_cast<const int*>(idp)[r];
  const int blk = u / {upb};
  const uint8_t* wr = reinterpret_cast<const uint8_t*>(wp) + (size_t)row * row_bytes;
  float w[{unit}];
  int start[{runs}];
  dec_{tname}(wr + (size_t)blk * {bytes}, u % {upb}, w, start);
  {ot}* o = reinterpret_cast<{ot}*>(op) + (size_t)r * K + blk * {qk};
#pragma unroll
  for (int q = 0; q < {runs}; q++) {{
    st8(o + start[q], w + 16 * q);
    st8(o + start[q] + 8, w + 16 * q + 8);
  }}
}}
"""


def fields(type_name: str) -> dict:
    qk, nbytes, upb, _ = TYPES[type_name]
    unit = qk // upb
    has_min = int(type_name in ("Q4_1", "Q5_1", "Q4_K", "Q5_K"))
    return dict(tname=type_name, qk=qk, bytes=nbytes, upb=upb, unit=unit, runs=unit // 16, has_min=has_min)




HOST = r"""
extern "C" void {prefix}_dequant(const void* w, const int* ids, void* out, int R, int K, int row_bytes) {{
  for (int r = 0; r < R; r++)
    for (int u = 0; u < (K / {qk}) * {upb}; u++) {deq}(w, ids, out, K, row_bytes, r, u);
}}
// activations quantized as the device does, then the warp's sum in its butterfly order: lane partials
// summed by xor-shuffle steps; xq (m, K) and xd (m, K / 32) come back too
extern "C" void {prefix}_gemv(const void* w, const void* x, int8_t* xq, float* xd, float* y, int n_rows, int m, int K,
                              int row_bytes) {{
  for (int g = 0; g < m * K / 32; g++) {qx}(x, xq, xd, m * K / 32, g);
  for (int row = 0; row < n_rows; row++) {{
    float part[32][{maxm}];
    for (int lane = 0; lane < 32; lane++) {gemv}_lane(w, xq, xd, m, K, row_bytes, row, lane, part[lane]);
    for (int t = 0; t < m; t++) {{
      float v[32], nv[32];
      for (int l = 0; l < 32; l++) v[l] = part[l][t];
      for (int o = 16; o > 0; o >>= 1) {{
        for (int l = 0; l < 32; l++) nv[l] = v[l] + v[l ^ o];
        for (int l = 0; l < 32; l++) v[l] = nv[l];
      }}
      y[(size_t)t * n_rows + row] = v[0];
    }}
  }}
}}
"""


def gemv_name(type_name: str, dtype: str, maxm: int) -> str:
    return f"leank_gemv_{type_name}_{dtype}_{maxm}"


def dequant_name(type_name: str, out_dtype: str) -> str:
    return f"leank_dequant_{type_name}_{out_dtype}"


def quant_x_name(dtype: str) -> str:
    return f"leank_quant_x_{dtype}"


def step_names(dtype: str) -> dict:
    """The entry points of `STEP` for activations of `dtype`."""
    return dict(norm=f"leank_rmsnorm_qx_{dtype}", silu=f"leank_silu_mul_qx_{dtype}", rope=f"leank_rope_qk_{dtype}")


STEP_THREADS = 512  # threads of the rmsnorm_qx block (one block per row, 8 activations a thread)
GEMV1_HOST_ROWS = (1, 2, 3)  # rows per warp of the one-row gemv built for host tests


def step_source(dtype: str) -> str:
    return COMMON + CODES + STEP.format(xt=C_TYPES[dtype], nt=STEP_THREADS, **step_names(dtype))


def gemv_source(type_name: str, dtype: str, maxm: int) -> str:
    return COMMON + CODES + GEMV.format(name=gemv_name(type_name, dtype, maxm), yt=C_TYPES[dtype], maxm=maxm,
                                        **fields(type_name))


def gemv1_name(type_name: str, dtype: str, nr: int) -> str:
    return f"leank_gemv1_{type_name}_{dtype}_{nr}"


def gemv1_source(type_name: str, dtype: str, nr: int) -> str:
    return COMMON + CODES + GEMV1.format(name=gemv1_name(type_name, dtype, nr), yt=C_TYPES[dtype], nr=nr,
                                         **fields(type_name))


def quant_x_source(dtype: str) -> str:
    return COMMON + CODES + QUANT_X.format(name=quant_x_name(dtype), xt=C_TYPES[dtype])


def dequant_source(type_name: str, out_dtype: str) -> str:
    return COMMON + DEQ.format(name=dequant_name(type_name, out_dtype), ot=C_TYPES[out_dtype], **fields(type_name))


def host_source(type_names, dtype: str, maxm: int, out_dtype: str = "float32") -> str:
    """The device functions of the kernels for `type_names`, plus host entry points
    `leank_host_<type>_dequant(w, ids, out, R, K, row_bytes)` and `leank_host_<type>_gemv(w, x, xq, xd,
    y float32, n_rows, m, K, row_bytes)`, and the step kernels' twins (`STEP_HOST`), for `nvcc -x cu`
    (tests on machines without a GPU)."""
    names = step_names(dtype)
    body = COMMON + CODES + QUANT_X.format(name=quant_x_name(dtype), xt=C_TYPES[dtype])
    body += STEP.format(xt=C_TYPES[dtype], nt=STEP_THREADS, **names) + STEP_HOST.format(xt=C_TYPES[dtype], **names)
    for t in type_names:
        f = fields(t)
        body += GEMV.format(name=gemv_name(t, dtype, maxm), yt=C_TYPES[dtype], maxm=maxm, **f)
        body += DEQ.format(name=dequant_name(t, out_dtype), ot=C_TYPES[out_dtype], **f)
        body += HOST.format(prefix=f"leank_host_{t}", deq=dequant_name(t, out_dtype), gemv=gemv_name(t, dtype, maxm),
                            qx=quant_x_name(dtype), maxm=maxm, **f)
        for nr in GEMV1_HOST_ROWS:
            body += GEMV1.format(name=gemv1_name(t, dtype, nr), yt=C_TYPES[dtype], nr=nr, **f)
            body += GEMV1_HOST.format(prefix=f"leank_host_{t}_{nr}", gemv1=gemv1_name(t, dtype, nr), nr=nr)
    return body
