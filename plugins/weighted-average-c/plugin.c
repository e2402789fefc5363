// weighted-average-c: out = sum of weights[i] * input[i].
// Params: {"weights": [w0, w1, ...], "elementwise": false}
//   weights      default: equal weights
//   elementwise  false: return a linear plan, the host does the arithmetic (fast, any dtype);
//                true: plan layer tensors `custom` and compute them here, in float32 or bfloat16.
// Arguments passed to exports are ours to free; results are freed by the generated post-return.
#include <stdlib.h>
#include <string.h>
#include "merge_rule_plugin.h"

#define MAX_INPUTS 16
static float weights[MAX_INPUTS];
static size_t num_weights = 0;
static bool elementwise = false;
static bool configured = false;

void exports_dus_plugin_info_describe(exports_dus_plugin_info_plugin_info_t *ret) {
  merge_rule_plugin_string_dup(&ret->name, "weighted-average-c");
  merge_rule_plugin_string_dup(&ret->version, "0.1.0");
  merge_rule_plugin_string_dup(&ret->description, "Weighted average of the inputs, natively or element-wise (C)");
}

// Just enough JSON for the two params: a flat object with a number list and a boolean.
bool exports_dus_plugin_merge_rule_configure(merge_rule_plugin_string_t *params, merge_rule_plugin_string_t *err) {
  char *text = strndup((const char *)params->ptr, params->len);
  merge_rule_plugin_string_free(params);
  num_weights = 0;
  const char *w = strstr(text, "\"weights\"");
  if (w) {
    const char *p = strchr(w, '[');
    if (!p) {
      merge_rule_plugin_string_dup(err, "params.weights must be a list of numbers");
      free(text);
      return false;
    }
    p++;
    while (*p && *p != ']') {
      char *end;
      float v = strtof(p, &end);
      if (end == p) {
        p++;
        continue;
      }
      if (num_weights == MAX_INPUTS) {
        merge_rule_plugin_string_dup(err, "at most 16 weights");
        free(text);
        return false;
      }
      weights[num_weights++] = v;
      p = end;
    }
  }
  const char *e = strstr(text, "\"elementwise\"");
  elementwise = e && strstr(e, "true") && (!strstr(e, "false") || strstr(e, "true") < strstr(e, "false"));
  configured = true;
  free(text);
  return true;
}

static float weight(size_t i, size_t n) { return num_weights ? weights[i] : 1.0f / (float)n; }

bool exports_dus_plugin_merge_rule_plan_tensor(exports_dus_plugin_merge_rule_tensor_info_t *tensor,
                                               exports_dus_plugin_merge_rule_merge_plan_t *ret,
                                               merge_rule_plugin_string_t *err) {
  size_t n = tensor->stats.len;
  bool ok = true;
  if (!configured) {
    merge_rule_plugin_string_dup(err, "plan-tensor called before configure");
    ok = false;
  } else if (num_weights && num_weights != n) {
    merge_rule_plugin_string_dup(err, "params.weights must have one weight per input model");
    ok = false;
  } else if (elementwise && tensor->layer.is_some && tensor->dtype != EXPORTS_DUS_PLUGIN_MERGE_RULE_DTYPE_FLOAT16) {
    ret->tag = EXPORTS_DUS_PLUGIN_MERGE_RULE_MERGE_PLAN_CUSTOM;
  } else {
    ret->tag = EXPORTS_DUS_PLUGIN_MERGE_RULE_MERGE_PLAN_LINEAR;
    ret->val.linear.len = n;
    ret->val.linear.ptr = malloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++) ret->val.linear.ptr[i] = weight(i, n);
  }
  exports_dus_plugin_merge_rule_tensor_info_free(tensor);
  return ok;
}

static float bf16_to_f32(uint16_t h) {
  uint32_t bits = (uint32_t)h << 16;
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

static uint16_t f32_to_bf16(float f) {
  uint32_t bits;
  memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffff) > 0x7f800000) return (uint16_t)((bits >> 16) | 0x40);  // NaN stays NaN
  bits += 0x7fff + ((bits >> 16) & 1);                                            // round to nearest even
  return (uint16_t)(bits >> 16);
}

bool exports_dus_plugin_merge_rule_merge_chunk(exports_dus_plugin_merge_rule_tensor_info_t *tensor, uint64_t offset,
                                               merge_rule_plugin_list_list_u8_t *inputs,
                                               merge_rule_plugin_list_u8_t *ret, merge_rule_plugin_string_t *err) {
  size_t n = inputs->len, bytes = n ? inputs->ptr[0].len : 0;
  bool bf16 = tensor->dtype == EXPORTS_DUS_PLUGIN_MERGE_RULE_DTYPE_BFLOAT16;
  bool ok = true;
  if (tensor->dtype == EXPORTS_DUS_PLUGIN_MERGE_RULE_DTYPE_FLOAT16) {
    merge_rule_plugin_string_dup(err, "float16 is merged natively only");
    ok = false;
  } else {
    size_t count = bytes / (bf16 ? 2 : 4);
    float *acc = calloc(count ? count : 1, sizeof(float));
    for (size_t m = 0; m < n; m++) {
      float w = weight(m, n);
      const uint8_t *src = inputs->ptr[m].ptr;
      if (bf16) {
        for (size_t i = 0; i < count; i++) {
          uint16_t h;
          memcpy(&h, src + 2 * i, 2);
          acc[i] += w * bf16_to_f32(h);
        }
      } else {
        for (size_t i = 0; i < count; i++) {
          float x;
          memcpy(&x, src + 4 * i, 4);
          acc[i] += w * x;
        }
      }
    }
    if (bf16) {
      uint16_t *out = malloc(count ? 2 * count : 1);
      for (size_t i = 0; i < count; i++) out[i] = f32_to_bf16(acc[i]);
      free(acc);
      ret->ptr = (uint8_t *)out;
    } else {
      ret->ptr = (uint8_t *)acc;
    }
    ret->len = bytes;
  }
  merge_rule_plugin_list_list_u8_free(inputs);
  exports_dus_plugin_merge_rule_tensor_info_free(tensor);
  return ok;
}
