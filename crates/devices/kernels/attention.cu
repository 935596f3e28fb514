// attention.cu: scaled dot-product self-attention as PyTorch's fused path trains it
// (FlashAttention-2's algorithm): no sequence x sequence matrix is ever stored. The forward
// walks the keys a tile at a time with an online softmax and saves the output and a float32
// log-sum-exp per query row; the backward recomputes each score from the log-sum-exp, tile by
// tile, in two kernels that each own what they write: one a query row's gradient, the other a
// key row's gradients (summed over the query heads that share it), so nothing is added
// atomically and every run adds in the same order.
//
// Layouts: q, o, dout and dq are [batch, sequence, heads, head_dim]; k, v, dk and dv are
// [batch, sequence, kv_heads, head_dim] (grouped-query attention: query head h reads key/value
// head h / (heads / kv_heads)); lse is [batch, sequence, heads], f32. Values share `storage`,
// are computed on in f32 and stored rounded. `causal`: query i sees keys 0..=i.
//
// Launch: block (ATTENTION_ROWS, 1, 1), a thread per query row (per key row in
// attention_backward_key); grid (ceil(sequence / ATTENTION_ROWS), min(batch x heads, 65535), 1),
// each block looping over the (sample, head) pairs past the grid (key/value heads in the key
// kernel). head_dim <= ATTENTION_MAX_HEAD_DIM.
//
// Dropout (`threshold` > -1): probability p_ij of sample b, head h is kept when the stream's
// uniform(key, ((b * heads + h) * sequence + i) * sequence + j) >= threshold, and then scaled
// by `keep_scale` (synthetic.cuh; crates/engine/src/program/geometry.rs's AttentionDropout).
// No mask is stored: forward and backward redraw it, as FlashAttention-2 redraws its Philox
// mask. The log-sum-exp is the undropped softmax's; the output is sum_j p_ij z_ij v_j.

#define ATTENTION_ROWS 64
#define ATTENTION_TILE 16
#define ATTENTION_MAX_HEAD_DIM 256

// -infinity (NVRTC without headers has no INFINITY): a masked score, an empty row's maximum.
#define ATTENTION_MINUS_INFINITY __int_as_float((int)0xff800000u)

// Where row t of head h of sample b begins in a [batch, sequence, heads, head_dim] tensor.
__device__ __forceinline__ long long head_row(long long b, long long t, long long h, long long sequence,
                                              long long heads, long long head_dim) {
    return ((b * sequence + t) * heads + h) * head_dim;
}

// Stages `rows` rows of head h (from row `first`) into `tile` as f32, the block's threads
// striding over the values.
__device__ __forceinline__ void stage_rows(float* tile, const void* values, long long b, long long first,
                                           long long rows, long long h, long long sequence, long long heads,
                                           long long head_dim, int storage) {
    for (long long e = threadIdx.x; e < rows * head_dim; e += blockDim.x) {
        const long long r = e / head_dim, c = e % head_dim;
        tile[e] = load_value(values, head_row(b, first + r, h, sequence, heads, head_dim) + c, storage);
    }
}

// What probability (b, h, i, j) is multiplied by: 1 without dropout, else keep_scale or 0.
__device__ __forceinline__ float attention_keep(unsigned long long key, float threshold, float keep_scale,
                                                long long b, long long h, long long i, long long j,
                                                long long heads, long long sequence) {
    if (threshold <= -1.0f) return 1.0f;
    const unsigned long long at = (((unsigned long long)b * heads + h) * sequence + i) * sequence + j;
    return uniform(key, (long long)at) >= threshold ? keep_scale : 0.0f;
}

__device__ __forceinline__ float dot_row(const float* a, const float* b, long long n) {
    float sum = 0.0f;
    for (long long c = 0; c < n; ++c) sum += a[c] * b[c];
    return sum;
}

// o = softmax(q k^T * scale (masked when causal)) v; lse = the log of each row's softmax sum,
// shifted by its maximum: log(sum_j exp(s_ij)).
extern "C" __global__ void attention_forward(const void* q, const void* k, const void* v, void* o, float* lse,
                                             long long batch, long long sequence, long long heads, long long kv_heads,
                                             long long head_dim, int causal, float scale, float threshold,
                                             float keep_scale, unsigned long long key, int storage) {
    __shared__ float k_tile[ATTENTION_TILE * ATTENTION_MAX_HEAD_DIM];
    __shared__ float v_tile[ATTENTION_TILE * ATTENTION_MAX_HEAD_DIM];
    for (long long pair = blockIdx.y; pair < batch * heads; pair += gridDim.y) {
        const long long b = pair / heads, h = pair % heads, g = h / (heads / kv_heads);
        const long long first = (long long)blockIdx.x * ATTENTION_ROWS;
        const long long i = first + threadIdx.x;
        const bool active = i < sequence;
        float qi[ATTENTION_MAX_HEAD_DIM], acc[ATTENTION_MAX_HEAD_DIM];
        for (long long c = 0; c < head_dim; ++c) {
            qi[c] = active ? load_value(q, head_row(b, i, h, sequence, heads, head_dim) + c, storage) : 0.0f;
            acc[c] = 0.0f;
        }
        float row_max = ATTENTION_MINUS_INFINITY, row_sum = 0.0f;
        const long long keys = causal ? min(sequence, first + ATTENTION_ROWS) : sequence;
        for (long long j0 = 0; j0 < keys; j0 += ATTENTION_TILE) {
            const long long n = min((long long)ATTENTION_TILE, keys - j0);
            stage_rows(k_tile, k, b, j0, n, g, sequence, kv_heads, head_dim, storage);
            stage_rows(v_tile, v, b, j0, n, g, sequence, kv_heads, head_dim, storage);
            __syncthreads();
            if (active) {
                float s[ATTENTION_TILE];
                float tile_max = ATTENTION_MINUS_INFINITY;
                for (long long r = 0; r < n; ++r) {
                    s[r] = causal && j0 + r > i ? ATTENTION_MINUS_INFINITY
                                                 : dot_row(qi, k_tile + r * head_dim, head_dim) * scale;
                    tile_max = fmaxf(tile_max, s[r]);
                }
                if (tile_max > ATTENTION_MINUS_INFINITY) {
                    const float new_max = fmaxf(row_max, tile_max);
                    const float correction = expf(row_max - new_max);
                    row_sum *= correction;
                    for (long long c = 0; c < head_dim; ++c) acc[c] *= correction;
                    for (long long r = 0; r < n; ++r) {
                        const float p = expf(s[r] - new_max);
                        row_sum += p;
                        const float kept = p * attention_keep(key, threshold, keep_scale, b, h, i, j0 + r, heads, sequence);
                        for (long long c = 0; c < head_dim; ++c) acc[c] += kept * v_tile[r * head_dim + c];
                    }
                    row_max = new_max;
                }
            }
            __syncthreads();
        }
        if (active) {
            const long long at = head_row(b, i, h, sequence, heads, head_dim);
            for (long long c = 0; c < head_dim; ++c) store_value(o, at + c, storage, acc[c] / row_sum);
            lse[(b * sequence + i) * heads + h] = row_max + logf(row_sum);
        }
    }
}

extern "C" __global__ void attention_backward_query(const void* q, const void* k, const void* v, const void* o,
                                                    const void* dout, const float* lse, void* dq,
                                                    long long batch, long long sequence, long long heads,
                                                    long long kv_heads, long long head_dim, int causal, float scale,
                                                    float threshold, float keep_scale, unsigned long long key, int storage) {
    __shared__ float k_tile[ATTENTION_TILE * ATTENTION_MAX_HEAD_DIM];
    __shared__ float v_tile[ATTENTION_TILE * ATTENTION_MAX_HEAD_DIM];
    for (long long pair = blockIdx.y; pair < batch * heads; pair += gridDim.y) {
        const long long b = pair / heads, h = pair % heads, g = h / (heads / kv_heads);
        const long long first = (long long)blockIdx.x * ATTENTION_ROWS;
        const long long i = first + threadIdx.x;
        const bool active = i < sequence;
        const long long at = head_row(b, i, h, sequence, heads, head_dim);
        float qi[ATTENTION_MAX_HEAD_DIM], doi[ATTENTION_MAX_HEAD_DIM], acc[ATTENTION_MAX_HEAD_DIM];
        float delta = 0.0f;
        for (long long c = 0; c < head_dim; ++c) {
            qi[c] = active ? load_value(q, at + c, storage) : 0.0f;
            doi[c] = active ? load_value(dout, at + c, storage) : 0.0f;
            delta += active ? doi[c] * load_value(o, at + c, storage) : 0.0f;
            acc[c] = 0.0f;
        }
        const float row_lse = active ? lse[(b * sequence + i) * heads + h] : 0.0f;
        const long long keys = causal ? min(sequence, first + ATTENTION_ROWS) : sequence;
        for (long long j0 = 0; j0 < keys; j0 += ATTENTION_TILE) {
            const long long n = min((long long)ATTENTION_TILE, keys - j0);
            stage_rows(k_tile, k, b, j0, n, g, sequence, kv_heads, head_dim, storage);
            stage_rows(v_tile, v, b, j0, n, g, sequence, kv_heads, head_dim, storage);
            __syncthreads();
            if (active) {
                for (long long r = 0; r < n; ++r) {
                    if (causal && j0 + r > i) break;
                    const float* kj = k_tile + r * head_dim;
                    const float p = expf(dot_row(qi, kj, head_dim) * scale - row_lse);
                    const float z = attention_keep(key, threshold, keep_scale, b, h, i, j0 + r, heads, sequence);
                    const float ds = p * (z * dot_row(doi, v_tile + r * head_dim, head_dim) - delta);
                    for (long long c = 0; c < head_dim; ++c) acc[c] += ds * kj[c];
                }
            }
            __syncthreads();
        }
        if (active) {
            for (long long c = 0; c < head_dim; ++c) store_value(dq, at + c, storage, acc[c] * scale);
        }
    }
}

extern "C" __global__ void attention_backward_key(const void* q, const void* k, const void* v, const void* o,
                                                  const void* dout, const float* lse, void* dk, void* dv,
                                                  long long batch, long long sequence, long long heads,
                                                  long long kv_heads, long long head_dim, int causal, float scale,
                                                  float threshold, float keep_scale, unsigned long long key, int storage) {
    __shared__ float q_tile[ATTENTION_TILE * ATTENTION_MAX_HEAD_DIM];
    __shared__ float do_tile[ATTENTION_TILE * ATTENTION_MAX_HEAD_DIM];
    __shared__ float lse_tile[ATTENTION_TILE];
    __shared__ float delta_tile[ATTENTION_TILE];
    const long long group = heads / kv_heads;
    for (long long pair = blockIdx.y; pair < batch * kv_heads; pair += gridDim.y) {
        const long long b = pair / kv_heads, g = pair % kv_heads;
        const long long first = (long long)blockIdx.x * ATTENTION_ROWS;
        const long long j = first + threadIdx.x;
        const bool active = j < sequence;
        const long long at = head_row(b, j, g, sequence, kv_heads, head_dim);
        float kj[ATTENTION_MAX_HEAD_DIM], vj[ATTENTION_MAX_HEAD_DIM];
        float dk_acc[ATTENTION_MAX_HEAD_DIM], dv_acc[ATTENTION_MAX_HEAD_DIM];
        for (long long c = 0; c < head_dim; ++c) {
            kj[c] = active ? load_value(k, at + c, storage) : 0.0f;
            vj[c] = active ? load_value(v, at + c, storage) : 0.0f;
            dk_acc[c] = 0.0f;
            dv_acc[c] = 0.0f;
        }
        for (long long h = g * group; h < (g + 1) * group; ++h) {
            for (long long i0 = causal ? first : 0; i0 < sequence; i0 += ATTENTION_TILE) {
                const long long n = min((long long)ATTENTION_TILE, sequence - i0);
                stage_rows(q_tile, q, b, i0, n, h, sequence, heads, head_dim, storage);
                stage_rows(do_tile, dout, b, i0, n, h, sequence, heads, head_dim, storage);
                if (threadIdx.x < n) {
                    const long long row = head_row(b, i0 + threadIdx.x, h, sequence, heads, head_dim);
                    float delta = 0.0f;
                    for (long long c = 0; c < head_dim; ++c) {
                        delta += load_value(dout, row + c, storage) * load_value(o, row + c, storage);
                    }
                    delta_tile[threadIdx.x] = delta;
                    lse_tile[threadIdx.x] = lse[(b * sequence + i0 + threadIdx.x) * heads + h];
                }
                __syncthreads();
                if (active) {
                    for (long long r = 0; r < n; ++r) {
                        if (causal && i0 + r < j) continue;
                        const float* qi = q_tile + r * head_dim;
                        const float* doi = do_tile + r * head_dim;
                        const float p = expf(dot_row(qi, kj, head_dim) * scale - lse_tile[r]);
                        const float z = attention_keep(key, threshold, keep_scale, b, h, i0 + r, j, heads, sequence);
                        const float ds = p * (z * dot_row(doi, vj, head_dim) - delta_tile[r]);
                        for (long long c = 0; c < head_dim; ++c) {
                            dv_acc[c] += p * z * doi[c];
                            dk_acc[c] += ds * qi[c];
                        }
                    }
                }
                __syncthreads();
            }
        }
        if (active) {
            for (long long c = 0; c < head_dim; ++c) {
                store_value(dk, at + c, storage, dk_acc[c] * scale);
                store_value(dv, at + c, storage, dv_acc[c]);
            }
        }
    }
}

// Rotary position embedding over [batch, sequence, heads, head_dim] values (head_dim even, half
// = head_dim / 2): feature i of position t turns by angle t * theta^(-2 (i mod half) / head_dim),
// computed in f32 as PyTorch computes its tables; rotate_half pairs feature i with i + half.
__device__ __forceinline__ float rotary_angle(long long t, long long i, long long head_dim, float theta) {
    const long long half = head_dim / 2;
    const float exponent = (float)(2 * (i % half)) / (float)head_dim;
    return (float)t * (1.0f / powf(theta, exponent));
}

// y = x * cos + rotate_half(x) * sin, rotate_half(x)[i] = -x[i + half] (i < half), x[i - half].
// x in `storage`, y in `out_storage` (f32 where the tables are: autocast's promotion).
// Launch: block (256, 1, 1); grid (min(ceil(values / 256), 2^20), 1, 1), grid-stride.
extern "C" __global__ void rotary_forward(const void* x, void* y, long long values, long long sequence,
                                          long long heads, long long head_dim, float theta, int storage,
                                          int out_storage) {
    const long long half = head_dim / 2;
    for (long long k = blockIdx.x * (long long)blockDim.x + threadIdx.x; k < values; k += (long long)gridDim.x * blockDim.x) {
        const long long i = k % head_dim;
        const long long t = k / (heads * head_dim) % sequence;
        const float angle = rotary_angle(t, i, head_dim, theta);
        const float rotated = i < half ? -load_value(x, k + half, storage) : load_value(x, k - half, storage);
        store_value(y, k, out_storage, load_value(x, k, storage) * cosf(angle) + rotated * sinf(angle));
    }
}

// Its backward: dx = dy * cos + rotate_half^T(dy * sin), rotate_half^T(g)[i] = g[i + half]
// (i < half), -g[i - half]; the partner's angle is the feature's own. dy in `storage`, dx in
// `out_storage`. Launch as rotary_forward.
extern "C" __global__ void rotary_backward(const void* dy, void* dx, long long values, long long sequence,
                                           long long heads, long long head_dim, float theta, int storage,
                                           int out_storage) {
    const long long half = head_dim / 2;
    for (long long k = blockIdx.x * (long long)blockDim.x + threadIdx.x; k < values; k += (long long)gridDim.x * blockDim.x) {
        const long long i = k % head_dim;
        const long long t = k / (heads * head_dim) % sequence;
        const float angle = rotary_angle(t, i, head_dim, theta);
        const float partner = i < half ? load_value(dy, k + half, storage) : -load_value(dy, k - half, storage);
        store_value(dx, k, out_storage, load_value(dy, k, storage) * cosf(angle) + partner * sinf(angle));
    }
}
