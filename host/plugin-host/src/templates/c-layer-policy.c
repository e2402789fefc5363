// {{name}}: a layer policy in C. Example: repeat the middle third of the base model's layers once.
// The host owns nothing we return: wit-bindgen's generated post-return frees it. Arguments are
// ours to free.
#include <stdlib.h>
#include "layer_policy_plugin.h"

void exports_dus_plugin_info_describe(exports_dus_plugin_info_plugin_info_t *ret) {
  layer_policy_plugin_string_dup(&ret->name, "{{name}}");
  layer_policy_plugin_string_dup(&ret->version, "0.1.0");
  layer_policy_plugin_string_dup(&ret->description, "{{name}} layer policy");
}

bool exports_dus_plugin_layer_policy_plan(exports_dus_plugin_layer_policy_list_model_config_t *models,
                                          layer_policy_plugin_string_t *params,
                                          exports_dus_plugin_layer_policy_layer_plan_t *ret,
                                          layer_policy_plugin_string_t *err) {
  if (models->len == 0) {
    layer_policy_plugin_string_dup(err, "needs a base model");
    exports_dus_plugin_layer_policy_list_model_config_free(models);
    layer_policy_plugin_string_free(params);
    return false;
  }
  uint32_t n = models->ptr[0].num_layers, lo = n / 3, hi = 2 * n / 3;
  size_t count = n + (hi - lo), k = 0;
  exports_dus_plugin_layer_policy_layer_source_t *layers = calloc(count, sizeof *layers);
  for (uint32_t l = 0; l < hi; l++) layers[k++].layer = l;
  for (uint32_t l = lo; l < hi; l++) layers[k++].layer = l;
  for (uint32_t l = hi; l < n; l++) layers[k++].layer = l;
  ret->base_model = 0;
  ret->layers.ptr = layers;
  ret->layers.len = count;
  exports_dus_plugin_layer_policy_list_model_config_free(models);
  layer_policy_plugin_string_free(params);
  return true;
}
