/*
 * Sealing slots: each page is encrypted and authenticated with AES-256-GCM
 * (OpenSSL libcrypto, which uses AES-NI/VAES and PCLMULQDQ) under a key that
 * lives only in this process, in one locked page that core dumps leave out.
 * See uswap_core.h for the conventions (-errno, no Python).
 *
 * Invariants:
 *   - The key is made with getrandom() when the sealer is made, never leaves
 *     the sealer's page (mlock'ed: never swapped; MADV_DONTDUMP: never in a
 *     core dump; MADV_WIPEONFORK: a child sees zeros and is refused), and is
 *     wiped when it is freed.  The expanded key schedule exists only inside
 *     one call, in an EVP_CIPHER_CTX that EVP_CIPHER_CTX_free wipes.
 *   - Nonce = the page's write generation, taken from one 64-bit counter per
 *     sealer with an atomic add: no two seals under one key share a nonce,
 *     whatever thread seals.  Generation 0 is never used ("never sealed").
 *   - The slot number is the additional authenticated data, and the caller
 *     keeps each slot's generation and tag: a page opened as another slot, an
 *     older ciphertext of the same slot (replay), or any flipped bit fails
 *     the tag check (-EBADMSG), like a checksum mismatch.
 */
#define _GNU_SOURCE
#include "uswap_core.h"

#include <errno.h>
#include <limits.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <unistd.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>

#define SEALER_ALIVE 0x7573776170736c31ULL   /* "uswapsl1"; zero in a forked child (WIPEONFORK) */
#define NONCE_BYTES 12                        /* GCM's native IV length */

struct uswap_sealer {
	uint64_t alive;
	uint64_t next_gen;            /* atomic; the next write generation, starts at 1 */
	EVP_CIPHER *cipher;           /* fetched once; immutable and shareable between threads */
	unsigned char key[USWAP_SEAL_KEY_BYTES];
};

_Static_assert(sizeof(struct uswap_sealer) <= 4096, "the sealer fits one locked page");

static size_t sealer_map_size(void)
{
	long page = sysconf(_SC_PAGESIZE);
	return page > 0 ? (size_t)page : 4096;
}

int uswap_sealer_new(struct uswap_sealer **out)
{
	size_t size = sealer_map_size();
	struct uswap_sealer *s = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (s == MAP_FAILED)
		return -errno;
	int ret;
	if (mlock(s, size) < 0 || madvise(s, size, MADV_DONTDUMP) < 0 || madvise(s, size, MADV_WIPEONFORK) < 0) {
		ret = -errno;
		munmap(s, size);
		return ret;
	}
	for (size_t got = 0; got < sizeof(s->key);) {
		ssize_t n = getrandom(s->key + got, sizeof(s->key) - got, 0);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			ret = -errno;
			goto fail;
		}
		got += (size_t)n;
	}
	s->cipher = EVP_CIPHER_fetch(NULL, "AES-256-GCM", NULL);
	if (!s->cipher) {
		ret = -ENOSYS;   /* no provider offers AES-256-GCM */
		goto fail;
	}
	s->next_gen = 1;
	s->alive = SEALER_ALIVE;
	*out = s;
	return 0;
fail:
	OPENSSL_cleanse(s, sizeof(*s));
	munmap(s, size);
	return ret;
}

void uswap_sealer_free(struct uswap_sealer *s)
{
	if (!s)
		return;
	EVP_CIPHER *cipher = s->cipher;
	OPENSSL_cleanse(s, sizeof(*s));
	EVP_CIPHER_free(cipher);
	munmap(s, sealer_map_size());   /* munmap drops the lock too */
}

static int sealer_usable(const struct uswap_sealer *s, size_t page_size)
{
	if (!s || s->alive != SEALER_ALIVE)
		return -EBADF;       /* freed, or a forked child's wiped copy */
	if (page_size == 0 || page_size > INT_MAX)
		return -EINVAL;      /* EVP takes an int length */
	return 0;
}

static void make_nonce(unsigned char nonce[NONCE_BYTES], uint64_t gen)
{
	memset(nonce, 0, NONCE_BYTES);
	for (int i = 0; i < 8; i++)
		nonce[i] = (unsigned char)(gen >> (8 * i));
}

static void make_aad(unsigned char aad[8], uint64_t slot)
{
	for (int i = 0; i < 8; i++)
		aad[i] = (unsigned char)(slot >> (8 * i));
}

int uswap_seal_pages(struct uswap_sealer *s, void *buf, size_t count, size_t page_size, uint64_t first_slot,
		     uint64_t *gens_out, uint8_t *tags_out)
{
	int ret = sealer_usable(s, page_size);
	if (ret < 0 || count == 0)
		return ret;
	uint64_t first_gen = __atomic_fetch_add(&s->next_gen, (uint64_t)count, __ATOMIC_RELAXED);
	if (first_gen == 0 || first_gen > UINT64_MAX - count)
		return -EOVERFLOW;   /* 2^64 page writes: the counter would wrap and repeat a nonce */
	EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
	if (!ctx)
		return -ENOMEM;
	ret = -EIO;
	if (EVP_EncryptInit_ex2(ctx, s->cipher, s->key, NULL, NULL) != 1)
		goto out;
	for (size_t i = 0; i < count; i++) {
		unsigned char *page = (unsigned char *)buf + i * page_size;
		unsigned char nonce[NONCE_BYTES], aad[8];
		uint64_t gen = first_gen + i;
		int len;
		make_nonce(nonce, gen);
		make_aad(aad, first_slot + i);
		if (EVP_EncryptInit_ex2(ctx, NULL, NULL, nonce, NULL) != 1
		    || EVP_EncryptUpdate(ctx, NULL, &len, aad, sizeof(aad)) != 1
		    || EVP_EncryptUpdate(ctx, page, &len, page, (int)page_size) != 1
		    || EVP_EncryptFinal_ex(ctx, page + len, &len) != 1
		    || EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_GET_TAG, USWAP_SEAL_TAG_BYTES,
					   tags_out + i * USWAP_SEAL_TAG_BYTES) != 1)
			goto out;
		gens_out[i] = gen;
	}
	ret = 0;
out:
	EVP_CIPHER_CTX_free(ctx);   /* wipes the key schedule */
	return ret;
}

int uswap_open_pages(struct uswap_sealer *s, void *buf, size_t count, size_t page_size, uint64_t first_slot,
		     const uint64_t *gens, const uint8_t *tags, int *bad_index)
{
	int ret = sealer_usable(s, page_size);
	if (ret < 0 || count == 0)
		return ret;
	EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
	if (!ctx)
		return -ENOMEM;
	ret = -EIO;
	if (EVP_DecryptInit_ex2(ctx, s->cipher, s->key, NULL, NULL) != 1)
		goto out;
	for (size_t i = 0; i < count; i++) {
		unsigned char *page = (unsigned char *)buf + i * page_size;
		unsigned char nonce[NONCE_BYTES], aad[8];
		int len;
		if (gens[i] == 0) {   /* never sealed: nothing can match */
			memset(page, 0, page_size);
			ret = -EBADMSG;
			*bad_index = (int)i;
			goto out;
		}
		make_nonce(nonce, gens[i]);
		make_aad(aad, first_slot + i);
		if (EVP_DecryptInit_ex2(ctx, NULL, NULL, nonce, NULL) != 1
		    || EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_TAG, USWAP_SEAL_TAG_BYTES,
					   (void *)(tags + i * USWAP_SEAL_TAG_BYTES)) != 1
		    || EVP_DecryptUpdate(ctx, NULL, &len, aad, sizeof(aad)) != 1
		    || EVP_DecryptUpdate(ctx, page, &len, page, (int)page_size) != 1)
			goto out;
		if (EVP_DecryptFinal_ex(ctx, page + len, &len) != 1) {
			/* Never leave unauthenticated plaintext behind. */
			memset(page, 0, page_size);
			ret = -EBADMSG;
			*bad_index = (int)i;
			goto out;
		}
	}
	ret = 0;
out:
	EVP_CIPHER_CTX_free(ctx);
	return ret;
}
