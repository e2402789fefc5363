// {{name}}: a merge rule in C. Example: layer tensors element-wise mean (custom, float32),
// everything else averaged natively by the host. Arguments are ours to free; results are freed
// by the generated post-return functions.
#include <stdlib.h>
#include <string.h>
#include "merge_rule_plugin.h"

void exports_dus_plugin_info_describe(exports_dus_plugin_info_plugin_info_t *ret) {
  merge_rule_plugin_string_dup(&ret->name, "{{name}}");
  merge_rule_plugin_string_dup(&ret->version, "0.1.0");
  merge_rule_plugin_string_dup(&ret->description, "{{name}} merge rule");
}

bool exports_dus_plugin_merge_rule_configure(merge_rule_plugin_string_t *params, merge_rule_plugin_string_t *err) {
  merge_rule_plugin_string_free(params);
  return true;
}

bool exports_dus_plugin_merge_rule_plan_tensor(exports_dus_plugin_merge_rule_tensor_info_t *tensor,
                                               exports_dus_plugin_merge_rule_merge_plan_t *ret,
                                               merge_rule_plugin_string_t *err) {
  size_t n = tensor->stats.len;
  if (tensor->layer.is_some && tensor->dtype == EXPORTS_DUS_PLUGIN_MERGE_RULE_DTYPE_FLOAT32) {
    ret->tag = EXPORTS_DUS_PLUGIN_MERGE_RULE_MERGE_PLAN_CUSTOM;
  } else {
    ret->tag = EXPORTS_DUS_PLUGIN_MERGE_RULE_MERGE_PLAN_LINEAR;
    ret->val.linear.len = n;
    ret->val.linear.ptr = malloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++) ret->val.linear.ptr[i] = 1.0f / (float)n;
  }
  exports_dus_plugin_merge_rule_tensor_info_free(tensor);
  return true;
}

bool exports_dus_plugin_merge_rule_merge_chunk(exports_dus_plugin_merge_rule_tensor_info_t *tensor, uint64_t offset,
                                               merge_rule_plugin_list_list_u8_t *inputs,
                                               merge_rule_plugin_list_u8_t *ret, merge_rule_plugin_string_t *err) {
  size_t bytes = inputs->len ? inputs->ptr[0].len : 0, count = bytes / 4, n = inputs->len;
  float *out = calloc(count ? count : 1, sizeof(float));
  for (size_t m = 0; m < n; m++) {
    float x;
    for (size_t i = 0; i < count; i++) {
      memcpy(&x, inputs->ptr[m].ptr + 4 * i, 4);
      out[i] += x / (float)n;
    }
  }
  ret->ptr = (uint8_t *)out;
  ret->len = bytes;
  merge_rule_plugin_list_list_u8_free(inputs);
  exports_dus_plugin_merge_rule_tensor_info_free(tensor);
  return true;
}
