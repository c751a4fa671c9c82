/* A minimal JNI binding of libpali for an Android app (see README, "Mobile").
 * Build it with the NDK's clang next to libpali.so for arm64-v8a, e.g. in the app's
 * CMakeLists.txt: add_library(pali_jni SHARED pali_jni.c) + target_link_libraries(pali_jni pali).
 *
 * Kotlin side:
 *   object Pali {
 *       init { System.loadLibrary("pali"); System.loadLibrary("pali_jni") }
 *       external fun load(decoder: String, mmproj: String): Long      // 0 on failure
 *       external fun run(model: Long, image: ByteArray, task: Int, text: String?): String
 *       external fun free(model: Long)
 *   }
 *   val json = Pali.run(model, jpegBytes, 0, "en")  // 0 = PALI_TASK_CAPTION
 */
#include <jni.h>
#include <stdint.h>
#include "pali.h"

JNIEXPORT jlong JNICALL Java_org_example_pali_Pali_load(JNIEnv *env, jobject self, jstring decoder,
                                                        jstring mmproj) {
    (void)self;
    const char *d = (*env)->GetStringUTFChars(env, decoder, NULL);
    const char *m = (*env)->GetStringUTFChars(env, mmproj, NULL);
    pali_model *model = NULL;
    char *error = NULL;
    pali_model_load(d, m, NULL, pali_model_params_default(), &model, &error);
    (*env)->ReleaseStringUTFChars(env, decoder, d);
    (*env)->ReleaseStringUTFChars(env, mmproj, m);
    pali_string_free(error); /* a real app logs or throws it */
    return (jlong)(intptr_t)model;
}

/* The task's JSON, or {"error": "..."}; image is the encoded file (JPEG/PNG/WebP). */
JNIEXPORT jstring JNICALL Java_org_example_pali_Pali_run(JNIEnv *env, jobject self, jlong model,
                                                         jbyteArray image, jint task, jstring text) {
    (void)self;
    jsize n = (*env)->GetArrayLength(env, image);
    jbyte *bytes = (*env)->GetByteArrayElements(env, image, NULL);
    const char *t = text ? (*env)->GetStringUTFChars(env, text, NULL) : NULL;
    pali_image img = {PALI_IMAGE_ENCODED, (const uint8_t *)bytes, (size_t)n, 0, 0, 0};
    char *json = NULL, *error = NULL;
    pali_status st = pali_run((const pali_model *)(intptr_t)model, &img, task, t, NULL, NULL, NULL,
                              &json, &error);
    (*env)->ReleaseByteArrayElements(env, image, bytes, JNI_ABORT);
    if (t) (*env)->ReleaseStringUTFChars(env, text, t);
    jstring out = (*env)->NewStringUTF(env, st == PALI_OK ? json : "{\"error\": \"see logcat\"}");
    pali_string_free(json);
    pali_string_free(error);
    return out;
}

JNIEXPORT void JNICALL Java_org_example_pali_Pali_free(JNIEnv *env, jobject self, jlong model) {
    (void)env;
    (void)self;
    pali_model_free((pali_model *)(intptr_t)model);
}
