#include "util/auth.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>

namespace kvxfer::auth {

namespace {

// kvxfer's threads (a progress thread answering a connection handshake, a notifier) can still
// be running while the process exits. OpenSSL's default atexit cleanup frees its locks under
// them (a crash in pthread_rwlock_wrlock on a null lock, seen at the exit of the ibverbs
// conformance tests), so the library asks OpenSSL to leave its state to the OS at exit.
void initCrypto() {
    static const bool ok = OPENSSL_init_crypto(OPENSSL_INIT_NO_ATEXIT, nullptr) == 1;
    (void)ok;
}

}  // namespace

Status randomBytes(uint8_t* out, size_t n) {
    initCrypto();
    if (RAND_bytes(out, static_cast<int>(n)) != 1) return Status::system("OpenSSL RAND_bytes failed");
    return Status::ok();
}

Result<Bytes> randomSecret() {
    Bytes s(PeerDescriptor::kSecretBytes);
    KVXFER_RETURN_IF_ERROR(randomBytes(s.data(), s.size()));
    return s;
}

Result<Nonce> randomNonce() {
    Nonce n{};
    KVXFER_RETURN_IF_ERROR(randomBytes(n.data(), n.size()));
    return n;
}

Mac mac(ByteView secret, std::initializer_list<ByteView> parts) {
    initCrypto();
    Bytes data;
    for (ByteView p : parts) data.insert(data.end(), p.begin(), p.end());
    Mac out{};
    unsigned len = 0;
    // On failure the all-zero MAC never equals a real proof of a random nonce.
    if (HMAC(EVP_sha256(), secret.data(), static_cast<int>(secret.size()), data.data(), data.size(),
             out.data(), &len) == nullptr ||
        len != out.size()) {
        out.fill(0);
    }
    return out;
}

bool equal(ByteView a, ByteView b) {
    return a.size() == b.size() && CRYPTO_memcmp(a.data(), b.data(), a.size()) == 0;
}

}  // namespace kvxfer::auth
