/* LoRA adapters through the C API: one line per check, "name status message-or-json"
 * (tests/c_api.rs reads them).
 *   lora_test MODEL.gguf MMPROJ.gguf ADAPTER.gguf IMAGE.png */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include "pali.h"

static void report(const char *name, pali_status st, char *error, char *json) {
    printf("%s %d %s\n", name, st, error ? error : (json ? json : ""));
    pali_string_free(error);
    pali_string_free(json);
}

static unsigned char *read_file(const char *path, size_t *size) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *buf = malloc(n > 0 ? (size_t)n : 1);
    *size = fread(buf, 1, (size_t)n, f);
    fclose(f);
    return buf;
}

/* A caption with these adapters; reports its status and JSON (or message). */
static void caption(const char *name, pali_model *model, const pali_image *img,
                    const pali_adapter_scale *lora, size_t n_lora) {
    char *error = NULL, *json = NULL;
    pali_generate_params p = pali_generate_params_default();
    p.n_predict = 8;
    p.lora = lora;
    p.n_lora = n_lora;
    pali_status st = pali_run(model, img, 1, PALI_TASK_CAPTION, "en", &p, NULL, NULL, &json, &error);
    report(name, st, error, json);
}

int main(int argc, char **argv) {
    if (argc < 5) return 2;
    char *error = NULL;
    pali_model *model = NULL;
    pali_status st = pali_model_load(argv[1], argv[2], NULL, pali_model_params_default(), &model, &error);
    report("load", st, error, NULL);
    if (st != PALI_OK) return 1;
    printf("abi %d\n", PALI_ABI_VERSION);

    int32_t id = -7;
    error = NULL;
    st = pali_adapter_load(model, NULL, &id, &error);
    report("adapter_null_path", st, error, NULL);
    error = NULL;
    st = pali_adapter_load(model, "/nonexistent/adapter.gguf", &id, &error);
    report("adapter_missing", st, error, NULL);
    error = NULL;
    st = pali_adapter_load(model, argv[1], &id, &error); /* the base decoder, not an adapter */
    report("adapter_not_adapter", st, error, NULL);
    error = NULL;
    st = pali_adapter_load(model, argv[3], NULL, &error);
    report("adapter_null_out", st, error, NULL);
    error = NULL;
    st = pali_adapter_load(model, argv[3], &id, &error);
    report("adapter_load", st, error, NULL);
    printf("adapter_id %d\n", id);

    size_t size = 0;
    unsigned char *png = read_file(argv[4], &size);
    pali_image img = {PALI_IMAGE_ENCODED, png, size, 0, 0, 0};
    pali_adapter_scale one = {id, 1.0f}, zero = {id, 0.0f}, unknown = {id + 5, 1.0f},
                       nan_scale = {id, NAN};
    caption("base", model, &img, NULL, 0);
    caption("with_lora", model, &img, &one, 1);
    caption("scale_zero", model, &img, &zero, 1);
    caption("unknown_id", model, &img, &unknown, 1);
    caption("nan_scale", model, &img, &nan_scale, 1);
    caption("null_lora", model, &img, NULL, 1);

    error = NULL;
    st = pali_adapter_free(model, id, &error);
    report("free", st, error, NULL);
    error = NULL;
    st = pali_adapter_free(model, id, &error);
    report("free_again", st, error, NULL);
    caption("freed_id", model, &img, &one, 1);

    free(png);
    pali_model_free(model);
    return 0;
}
