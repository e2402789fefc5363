// {{name}}: a data filter in C. Example: drop records whose JSON text is shorter than
// `min_bytes` (params {"min_bytes": N}). Arguments are ours to free; results are freed by the
// generated post-return functions.
#include <stdlib.h>
#include <string.h>
#include "data_filter_plugin.h"

static long min_bytes = -1;

void exports_dus_plugin_info_describe(exports_dus_plugin_info_plugin_info_t *ret) {
  data_filter_plugin_string_dup(&ret->name, "{{name}}");
  data_filter_plugin_string_dup(&ret->version, "0.1.0");
  data_filter_plugin_string_dup(&ret->description, "{{name}} data filter");
}

bool exports_dus_plugin_data_filter_configure(data_filter_plugin_string_t *params, data_filter_plugin_string_t *err) {
  char *text = strndup((const char *)params->ptr, params->len);
  const char *key = strstr(text, "\"min_bytes\"");
  min_bytes = key ? strtol(strchr(key, ':') + 1, NULL, 10) : 0;
  free(text);
  data_filter_plugin_string_free(params);
  return true;
}

bool exports_dus_plugin_data_filter_filter_batch(data_filter_plugin_list_string_t *records,
                                                 exports_dus_plugin_data_filter_list_verdict_t *ret,
                                                 data_filter_plugin_string_t *err) {
  if (min_bytes < 0) {
    data_filter_plugin_string_dup(err, "filter-batch called before configure");
    data_filter_plugin_list_string_free(records);
    return false;
  }
  ret->len = records->len;
  ret->ptr = calloc(records->len ? records->len : 1, sizeof *ret->ptr);
  for (size_t i = 0; i < records->len; i++) {
    ret->ptr[i].tag = (long)records->ptr[i].len >= min_bytes ? EXPORTS_DUS_PLUGIN_DATA_FILTER_VERDICT_KEEP
                                                              : EXPORTS_DUS_PLUGIN_DATA_FILTER_VERDICT_DROP;
  }
  data_filter_plugin_list_string_free(records);
  return true;
}
