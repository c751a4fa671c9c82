/* Caption an image and find objects in it with libpali.
 *
 *   cc examples/c/caption.c -Icapi/include -Ltarget/release -lpali -o caption
 *   LD_LIBRARY_PATH=target/release ./caption MODEL.gguf MMPROJ.gguf IMAGE [OBJECTS]
 *
 * Prints the caption's JSON and, with OBJECTS ("circle ; square"), the detection's JSON:
 * the same objects `pali caption --json` / `pali detect --json` print. The caption streams
 * to stderr as it is generated. */
#include <stdio.h>
#include <stdlib.h>
#include "pali.h"

static bool on_token(const char *piece, void *user_data) {
    (void)user_data;
    fputs(piece, stderr);
    return true; /* false would cancel */
}

/* The whole file, as a camera or the file system hands it over. */
static unsigned char *read_file(const char *path, size_t *size) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *buf = n > 0 ? malloc((size_t)n) : NULL;
    *size = buf ? fread(buf, 1, (size_t)n, f) : 0;
    fclose(f);
    return buf;
}

static int fail(const char *what, pali_status status, char *error) {
    fprintf(stderr, "%s failed (status %d): %s\n", what, status, error ? error : "");
    pali_string_free(error);
    return 1;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s MODEL.gguf MMPROJ.gguf IMAGE [OBJECTS]\n", argv[0]);
        return 2;
    }
    pali_model *model = NULL;
    char *error = NULL;
    pali_status st = pali_model_load(argv[1], argv[2], NULL, pali_model_params_default(), &model, &error);
    if (st != PALI_OK) return fail("pali_model_load", st, error);

    size_t size = 0;
    unsigned char *bytes = read_file(argv[3], &size);
    if (!bytes) {
        fprintf(stderr, "cannot read %s\n", argv[3]);
        pali_model_free(model);
        return 1;
    }
    pali_image image = {PALI_IMAGE_ENCODED, bytes, size, 0, 0, 0};
    pali_generate_params params = pali_generate_params_default();
    char *json = NULL;
    st = pali_run(model, &image, 1, PALI_TASK_CAPTION, "en", &params, on_token, NULL, &json, &error);
    fputc('\n', stderr);
    if (st != PALI_OK) return fail("caption", st, error);
    printf("%s\n", json);
    pali_string_free(json);

    if (argc > 4) {
        st = pali_run(model, &image, 1, PALI_TASK_DETECT, argv[4], &params, NULL, NULL, &json, &error);
        if (st != PALI_OK) return fail("detect", st, error);
        printf("%s\n", json);
        pali_string_free(json);
    }
    free(bytes);
    pali_model_free(model);
    return 0;
}
