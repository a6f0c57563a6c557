/* KIVI quantization and packing of the middle region on a CPU, bit for bit leank/kernels/quant.py.

   Built with cpu_decode.c by leank/kernels/cpu.py; quant.py (quantize_k, quantize_v) defines the result
   and the tests compare the two byte for byte. Moving a block of tokens into the middle region in torch
   took some twenty small operations a head group (amin, amax, float16 rounding and its outward
   correction, divide, round, clamp, shift, sum), about 1.4 ms a layer of SmolLM2; here one pass reads
   the full region's rows (float32 or float16, kept channels gathered on the way) and writes codes,
   scales and mins straight into the group's buffers.

   Every step is quant.py's, in the same float32 arithmetic: min = float16(lo), stepped down when it
   rounded above lo; span = max(hi - min, 0); scale = float16(span / levels), stepped up when
   scale * levels < span; code = round-half-even((x - min) / (scale > 0 ? scale : 1)) clamped to
   [0, levels]. float32 -> float16 is rounded to nearest even in software, the same everywhere. Codes are
   packed as quant.py packs them: byte j of a row holds channels j*per .. j*per+per-1, channel j*per+i in
   bits [i*bits, (i+1)*bits), per = 8 / bits, the last byte zero-padded.
   One difference, of no value: where a group's minimum is a zero present with both signs (or its span a
   zero of either sign), torch's vectorized reduction picks +0 or -0 by its order and this loop the
   first it meets; the float16 bits then differ in the sign of zero only, which decodes alike. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_common.h"

#define MAX_C 1024

/* float32 -> float16, round to nearest even (torch's conversion), overflow to inf, NaN kept NaN */
static uint16_t float_to_half(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000, ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) return (uint16_t)(sign | 0x7c00 | (ax > 0x7f800000u ? 0x200 : 0));
    if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00); /* >= 65520 rounds past 65504 */
    if (ax < 0x38800000u) { /* below 2^-14: a subnormal float16, in units of 2^-24 */
        if (ax < 0x33000000u) return (uint16_t)sign; /* below 2^-25: zero */
        uint32_t e = ax >> 23, m = (ax & 0x7fffffu) | 0x800000u, shift = 126 - e;
        uint32_t q = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (q & 1))) q++;
        return (uint16_t)(sign | q);
    }
    uint32_t h = (ax >> 13) - (112u << 10), rem = ax & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1))) h++;
    return (uint16_t)(sign | h);
}

/* the float16 next to h toward +inf (up) or -inf, as quant.py's _fp16_toward (16-bit wrap included) */
static uint16_t half_toward(uint16_t h, int up) {
    int positive = !(h & 0x8000);
    if (up) return h == 0x8000 ? 1 : (uint16_t)(positive ? h + 1 : h - 1);
    return h == 0 ? 0x8001 : (uint16_t)(positive ? h - 1 : h + 1);
}

static void quant_params(float lo, float hi, int bits, uint16_t *scale, uint16_t *mn) {
    const float levels = (float)((1 << bits) - 1);
    uint16_t m = float_to_half(lo);
    if (leank_half_to_float(m) > lo) m = half_toward(m, 0);
    float span = hi - leank_half_to_float(m);
    span = span < 0.0f ? 0.0f : span; /* NaN stays NaN, as torch's clamp_min */
    uint16_t s = float_to_half(span / levels);
    if (leank_half_to_float(s) * levels < span) s = half_toward(s, 1);
    *scale = s;
    *mn = m;
}

static inline uint8_t code_of(float x, float mn, float div, float levels) {
    float q = rintf((x - mn) / div);
    q = q < 0.0f ? 0.0f : q;
    q = q > levels ? levels : q;
    return (uint8_t)q;
}

/* n codes -> packed bytes (quant.py's pack) */
static inline void pack_row(const uint8_t *restrict codes, int n, int bits, uint8_t *restrict out) {
    if (bits == 8) {
        memcpy(out, codes, (size_t)n);
        return;
    }
    const int per = 8 / bits, w = (n + per - 1) / per;
    for (int j = 0; j < w; j++) {
        unsigned b = 0;
        for (int i = 0; i < per && j * per + i < n; i++) b |= (unsigned)codes[j * per + i] << (i * bits);
        out[j] = (uint8_t)b;
    }
}

/* row t's values at the plane's channels (ch, or 0..C-1 when NULL) as float32 */
static inline void load_row(const void *src, int half, int64_t off, const int64_t *ch, int C, float *out) {
    if (half) {
        const uint16_t *s = (const uint16_t *)src + off;
        if (ch) for (int i = 0; i < C; i++) out[i] = leank_half_to_float(s[ch[i]]);
        else leank_halves_to_floats(s, out, C);
    } else {
        const float *s = (const float *)src + off;
        if (ch) for (int i = 0; i < C; i++) out[i] = s[ch[i]];
        else memcpy(out, s, sizeof(float) * (size_t)C);
    }
}

/* K of one head: n tokens (a multiple of G) of C channels, per channel over groups of G tokens (quant.py's
   quantize_k). Row t at src + t*sst elements, its channel i at ch[i] (ch NULL: i); codes of token t at
   codes + t*cst; scale and min of token group j at j*pst. x: G*C floats of work. */
static void quant_k_plane(const void *src, int half, int64_t sst, const int64_t *ch, int C, int n, int bits, int G,
                          uint8_t *codes, int64_t cst, uint16_t *scale, uint16_t *mn, int64_t pst, float *x) {
    const float levels = (float)((1 << bits) - 1);
    float mnf[MAX_C], div[MAX_C];
    uint8_t row[MAX_C];
    for (int j = 0; j < n / G; j++) {
        for (int u = 0; u < G; u++) load_row(src, half, (int64_t)(j * G + u) * sst, ch, C, x + (size_t)u * C);
        uint16_t *ps = scale + j * pst, *pm = mn + j * pst;
        for (int i = 0; i < C; i++) {
            float lo = x[i], hi = x[i];
            for (int u = 1; u < G; u++) { /* NaN-propagating, as torch's amin / amax */
                float v = x[(size_t)u * C + i];
                lo = (v < lo || v != v) ? v : lo;
                hi = (v > hi || v != v) ? v : hi;
            }
            quant_params(lo, hi, bits, ps + i, pm + i);
            float s = leank_half_to_float(ps[i]);
            mnf[i] = leank_half_to_float(pm[i]);
            div[i] = s > 0.0f ? s : 1.0f;
        }
        for (int u = 0; u < G; u++) {
            const float *xr = x + (size_t)u * C;
            for (int i = 0; i < C; i++) row[i] = code_of(xr[i], mnf[i], div[i], levels);
            pack_row(row, C, bits, codes + (int64_t)(j * G + u) * cst);
        }
    }
}

/* V of one head: n tokens of D channels (a multiple of G), per token over groups of G channels (quant.py's
   quantize_v). Row t at src + t*sst elements; codes at codes + t*cst; scale and min of token t at t*pst. */
static void quant_v_plane(const void *src, int half, int64_t sst, int D, int n, int bits, int G, uint8_t *codes,
                          int64_t cst, uint16_t *scale, uint16_t *mn, int64_t pst) {
    const float levels = (float)((1 << bits) - 1);
    float x[MAX_C];
    uint8_t row[MAX_C];
    for (int t = 0; t < n; t++) {
        load_row(src, half, (int64_t)t * sst, NULL, D, x);
        uint16_t *ps = scale + (int64_t)t * pst, *pm = mn + (int64_t)t * pst;
        for (int g = 0; g < D / G; g++) {
            const float *xg = x + g * G;
            float lo = xg[0], hi = xg[0];
            for (int i = 1; i < G; i++) {
                float v = xg[i];
                lo = (v < lo || v != v) ? v : lo;
                hi = (v > hi || v != v) ? v : hi;
            }
            quant_params(lo, hi, bits, ps + g, pm + g);
            float s = leank_half_to_float(ps[g]), m = leank_half_to_float(pm[g]), div = s > 0.0f ? s : 1.0f;
            for (int i = 0; i < G; i++) row[g * G + i] = code_of(xg[i], m, div, levels);
        }
        pack_row(row, D, bits, codes + (int64_t)t * cst);
    }
}

static int check(int B, int H, int n, int C, int bits, int G) {
    if (B <= 0 || H <= 0 || n < 0 || C <= 0 || C > MAX_C || G <= 0) return -1;
    if (!(bits == 2 || bits == 4 || bits == 8)) return -1;
    return 0;
}

/* No OpenMP here: a block of 32 tokens is microseconds of work, and on a loaded 2-core machine waking a
   second thread for it took up to 8 ms. */

/* K of B sequences x H heads, n tokens (a multiple of G), C channels (quant.py's quantize_k). Source
   element (b, h, t, i) at src + b*ssb + heads[h]*ssh + t*sst + channels[h*ch_stride + i] elements (heads,
   channels NULL: h, i), float16 when `half`. Codes (b, h, t) at codes + b*csb + h*csh + t*cst bytes; scale
   and min (b, h, j, i) at b*psb + h*psh + j*pst + i. */
int leank_quantize_k(const void *src, int half, int64_t ssb, int64_t ssh, int64_t sst, const int64_t *heads,
                     const int64_t *channels, int64_t ch_stride, int B, int H, int n, int C, int bits, int G,
                     uint8_t *codes, int64_t csb, int64_t csh, int64_t cst, uint16_t *scale, uint16_t *mn,
                     int64_t psb, int64_t psh, int64_t pst) {
    if (check(B, H, n, C, bits, G) || n % G) return -1;
    float *x = (float *)malloc(sizeof(float) * (size_t)G * C);
    if (!x) return -1;
    const int esz = half ? 2 : 4;
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++)
            quant_k_plane((const char *)src + (b * ssb + (heads ? heads[h] : h) * ssh) * esz, half, sst,
                          channels ? channels + h * ch_stride : NULL, C, n, bits, G, codes + b * csb + h * csh, cst,
                          scale + b * psb + h * psh, mn + b * psb + h * psh, pst, x);
    free(x);
    return 0;
}

/* V of B sequences x H heads, n tokens, D channels (a multiple of G) (quant.py's quantize_v). Source element
   (b, h, t, d) at src + b*ssb + heads[h]*ssh + t*sst + d; codes as for leank_quantize_k; scale and min
   (b, h, t, g) at b*psb + h*psh + t*pst + g. */
int leank_quantize_v(const void *src, int half, int64_t ssb, int64_t ssh, int64_t sst, const int64_t *heads,
                     int B, int H, int n, int D, int bits, int G, uint8_t *codes, int64_t csb, int64_t csh,
                     int64_t cst, uint16_t *scale, uint16_t *mn, int64_t psb, int64_t psh, int64_t pst) {
    if (check(B, H, n, D, bits, G) || D % G) return -1;
    const int esz = half ? 2 : 4;
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++)
            quant_v_plane((const char *)src + (b * ssb + (heads ? heads[h] : h) * ssh) * esz, half, sst, D, n, bits, G,
                          codes + b * csb + h * csh, cst, scale + b * psb + h * psh, mn + b * psb + h * psh, pst);
    return 0;
}

/* One layer's move into the middle region (CompressedCache._compact), in one call: the full region's
   tokens [S, S + n) of every sequence b < B and KV head h < Hkv go to middle tokens [M0, M0 + n) of the
   head's group, K of its kept channels and V quantized (bits 2, 4, 8) or copied (16: the full region's
   type), then tokens [S + n, S + n + keep) move down to S. Full region element (b, h, t, d) at
   b*sb + h*sh + t*st + d elements of fk / fv (float16 when `half`); the groups' buffers, grown by the
   caller, through `heads` (entries at token 0; H_C = 0: the head stores no middle). n and M0 are
   multiples of G. In torch this was some forty small operations and two copies a layer (1.4 ms on
   SmolLM2, then 0.5 ms with the quantizer alone in C); returns 0, or -1 for arguments it does not handle. */
int leank_compact_layer(void *fk, void *fv, int half, int64_t sb, int64_t sh, int64_t st, int B, int Hkv, int D,
                        int S, int n, int keep, int M0, int G, int k_bits, int v_bits, const int64_t *heads) {
    if (B <= 0 || Hkv <= 0 || D <= 0 || D > MAX_C || S < 0 || n < 0 || keep < 0 || M0 < 0 || G <= 0 || n % G ||
        M0 % G || D % G)
        return -1;
    if (!((k_bits == 2 || k_bits == 4 || k_bits == 8 || k_bits == 16) &&
          (v_bits == 2 || v_bits == 4 || v_bits == 8 || v_bits == 16)))
        return -1;
    const int esz = half ? 2 : 4;
    float *x = (float *)malloc(sizeof(float) * (size_t)G * D);
    if (!x) return -1;
    for (int b = 0; b < B; b++)
        for (int h = 0; h < Hkv; h++) {
            const int64_t *e = heads + ((int64_t)b * Hkv + h) * H_FIELDS;
            const int c = (int)e[H_C];
            const int64_t off = b * sb + h * sh;
            char *k0 = (char *)fk + (off + (int64_t)S * st) * esz, *v0 = (char *)fv + (off + (int64_t)S * st) * esz;
            if (c > 0 && n > 0) {
                const int64_t *ch = (const int64_t *)(intptr_t)e[H_CH];
                if (k_bits == 16) {
                    char *mk = (char *)(intptr_t)e[H_MK] + (int64_t)M0 * e[H_MK_STRIDE] * esz;
                    for (int t = 0; t < n; t++) {
                        const char *row = k0 + (int64_t)t * st * esz;
                        char *dst = mk + (int64_t)t * e[H_MK_STRIDE] * esz;
                        for (int i = 0; i < c; i++) memcpy(dst + (size_t)i * esz, row + ch[i] * esz, (size_t)esz);
                    }
                } else {
                    quant_k_plane(k0, half, st, ch, c, n, k_bits, G, (uint8_t *)(intptr_t)e[H_MK] + (int64_t)M0 * e[H_MK_STRIDE],
                                  e[H_MK_STRIDE], (uint16_t *)(intptr_t)e[H_KS] + (int64_t)(M0 / G) * c,
                                  (uint16_t *)(intptr_t)e[H_KM] + (int64_t)(M0 / G) * c, c, x);
                }
                if (v_bits == 16) {
                    char *mv = (char *)(intptr_t)e[H_MV] + (int64_t)M0 * e[H_MV_STRIDE] * esz;
                    for (int t = 0; t < n; t++)
                        memcpy(mv + (int64_t)t * e[H_MV_STRIDE] * esz, v0 + (int64_t)t * st * esz, (size_t)D * esz);
                } else {
                    const int NG = D / G;
                    quant_v_plane(v0, half, st, D, n, v_bits, G, (uint8_t *)(intptr_t)e[H_MV] + (int64_t)M0 * e[H_MV_STRIDE],
                                  e[H_MV_STRIDE], (uint16_t *)(intptr_t)e[H_VS] + (int64_t)M0 * NG,
                                  (uint16_t *)(intptr_t)e[H_VM] + (int64_t)M0 * NG, NG);
                }
            }
            /* the recent tokens move down over the moved ones, a row at a time in ascending order (the
               source is above the destination: no row is overwritten before it is read) */
            for (int t = 0; t < keep; t++) {
                memmove(k0 + (int64_t)t * st * esz, k0 + (int64_t)(t + n) * st * esz, (size_t)D * esz);
                memmove(v0 + (int64_t)t * st * esz, v0 + (int64_t)(t + n) * st * esz, (size_t)D * esz);
            }
        }
    free(x);
    return 0;
}
