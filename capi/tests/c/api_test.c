/* Bad input through the C API, and raw RGB8 pixels: one line per check,
 * "name status message" (tests/c_api.rs reads them).
 *   api_test MODEL.gguf MMPROJ.gguf IMAGE.png RAW.rgb WIDTH HEIGHT */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
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

/* Runs one call and reports its status and message (error is set by the call). */
#define CHECK(name, call)                 \
    do {                                  \
        error = NULL;                     \
        pali_status check_ = (call);      \
        report(name, check_, error, NULL); \
        error = NULL;                     \
    } while (0)

static int tokens_seen = 0;
static bool stop_after_two(const char *piece, void *user_data) {
    (void)piece;
    int *n = user_data;
    return ++*n < 2;
}

int main(int argc, char **argv) {
    if (argc < 7) return 2;
    char *error = NULL, *json = NULL;
    pali_model *model = NULL;
    pali_model_params mp = pali_model_params_default();

    CHECK("load_null_decoder", pali_model_load(NULL, argv[2], NULL, mp, &model, &error));
    CHECK("load_missing_file", pali_model_load("/nonexistent/model.gguf", argv[2], NULL, mp, &model, &error));
    CHECK("load_swapped_files", pali_model_load(argv[2], argv[1], NULL, mp, &model, &error));
    CHECK("load_null_out", pali_model_load(argv[1], argv[2], NULL, mp, NULL, &error));
    pali_status st = pali_model_load(argv[1], argv[2], NULL, mp, &model, &error);
    report("load", st, error, NULL);
    if (st != PALI_OK) return 1;
    error = NULL;
    (void)json;

    size_t png_size = 0, raw_size = 0;
    unsigned char *png = read_file(argv[3], &png_size);
    unsigned char *raw = read_file(argv[4], &raw_size);
    uint32_t w = (uint32_t)atoi(argv[5]), h = (uint32_t)atoi(argv[6]);
    pali_image encoded = {PALI_IMAGE_ENCODED, png, png_size, 0, 0, 0};
    pali_generate_params gp = pali_generate_params_default();

    CHECK("run_null_model", pali_run(NULL, &encoded, 1, PALI_TASK_CAPTION, "en", &gp, NULL, NULL, &json, &error));
    CHECK("run_null_image", pali_run(model, NULL, 1, PALI_TASK_CAPTION, "en", &gp, NULL, NULL, &json, &error));
    CHECK("run_null_out_json", pali_run(model, &encoded, 1, PALI_TASK_CAPTION, "en", &gp, NULL, NULL, NULL, &error));
    unsigned char junk[64];
    memset(junk, 0xAB, sizeof junk);
    pali_image corrupt = {PALI_IMAGE_ENCODED, junk, sizeof junk, 0, 0, 0};
    CHECK("run_corrupt_image", pali_run(model, &corrupt, 1, PALI_TASK_CAPTION, "en", &gp, NULL, NULL, &json, &error));
    pali_image truncated = {PALI_IMAGE_ENCODED, png, png_size / 2, 0, 0, 0};
    CHECK("run_truncated_image", pali_run(model, &truncated, 1, PALI_TASK_CAPTION, "en", &gp, NULL, NULL, &json, &error));
    pali_image short_rgb = {PALI_IMAGE_RGB8, raw, raw_size, w, h + 1, 0};
    CHECK("run_rgb_too_small", pali_run(model, &short_rgb, 1, PALI_TASK_CAPTION, "en", &gp, NULL, NULL, &json, &error));
    pali_image bad_stride = {PALI_IMAGE_RGB8, raw, raw_size, w, h, w};
    CHECK("run_rgb_bad_stride", pali_run(model, &bad_stride, 1, PALI_TASK_CAPTION, "en", &gp, NULL, NULL, &json, &error));
    pali_image bad_format = {7, raw, raw_size, w, h, 0};
    CHECK("run_bad_format", pali_run(model, &bad_format, 1, PALI_TASK_CAPTION, "en", &gp, NULL, NULL, &json, &error));
    CHECK("run_bad_task", pali_run(model, &encoded, 1, 42, "en", &gp, NULL, NULL, &json, &error));
    CHECK("run_detect_no_objects", pali_run(model, &encoded, 1, PALI_TASK_DETECT, NULL, &gp, NULL, NULL, &json, &error));
    pali_generate_params tight = gp;
    tight.n_ctx = 16;
    CHECK("run_prompt_too_long", pali_run(model, &encoded, 1, PALI_TASK_CAPTION, "en", &tight, NULL, NULL, &json, &error));
    pali_generate_params zero = gp;
    zero.n_predict = 0;
    CHECK("run_bad_params", pali_run(model, &encoded, 1, PALI_TASK_CAPTION, "en", &zero, NULL, NULL, &json, &error));
    pali_generate_params cold = gp;
    cold.temperature = -1.0f;
    CHECK("run_bad_temperature", pali_run(model, &encoded, 1, PALI_TASK_CAPTION, "en", &cold, NULL, NULL, &json, &error));
    pali_generate_params wide = gp;
    wide.top_p = 7.0f;
    CHECK("run_bad_top_p", pali_run(model, &encoded, 1, PALI_TASK_CAPTION, "en", &wide, NULL, NULL, &json, &error));
    pali_generate_params negk = gp;
    negk.top_k = -1;
    CHECK("run_bad_top_k", pali_run(model, &encoded, 1, PALI_TASK_CAPTION, "en", &negk, NULL, NULL, &json, &error));
    CHECK("run_no_images", pali_run(model, &encoded, 0, PALI_TASK_CAPTION, "en", &gp, NULL, NULL, &json, &error));
    pali_image pair_bad[2] = {encoded, corrupt};
    CHECK("run_second_image_corrupt", pali_run(model, pair_bad, 2, PALI_TASK_CAPTION, "en", &gp, NULL, NULL, &json, &error));
    CHECK("run_cancelled", pali_run(model, &encoded, 1, PALI_TASK_CAPTION, "en", &gp, stop_after_two, &tokens_seen, &json, &error));

    /* The same pixels as RGB8, packed and with padded rows: the same caption. */
    json = NULL;
    pali_image packed = {PALI_IMAGE_RGB8, raw, raw_size, w, h, 0};
    st = pali_run(model, &packed, 1, PALI_TASK_CAPTION, "en", NULL, NULL, NULL, &json, &error);
    report("rgb_packed", st, error, json);
    error = NULL;
    json = NULL;
    uint32_t stride = w * 3 + 13;
    unsigned char *padded = calloc((size_t)stride * h, 1);
    for (uint32_t y = 0; y < h; y++) memcpy(padded + (size_t)y * stride, raw + (size_t)y * w * 3, (size_t)w * 3);
    pali_image strided = {PALI_IMAGE_RGB8, padded, (size_t)stride * h, w, h, stride};
    st = pali_run(model, &strided, 1, PALI_TASK_CAPTION, "en", NULL, NULL, NULL, &json, &error);
    report("rgb_strided", st, error, json);
    error = NULL;
    json = NULL;
    st = pali_run(model, &encoded, 1, PALI_TASK_CAPTION, "en", NULL, NULL, NULL, &json, &error);
    report("encoded", st, error, json);
    /* Two images, one prompt: the encoded file and its raw pixels. */
    error = NULL;
    json = NULL;
    pali_image pair[2] = {encoded, packed};
    st = pali_run(model, pair, 2, PALI_TASK_CAPTION, "en", NULL, NULL, NULL, &json, &error);
    report("two_images", st, error, json);

    pali_model_free(model);
    pali_model_free(NULL);
    pali_string_free(NULL);
    printf("version %d %s\n", PALI_OK, pali_version());
    free(png);
    free(raw);
    free(padded);
    return 0;
}
