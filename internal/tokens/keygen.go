package tokens

import (
	"crypto/rand"
	"fmt"
	"hash/crc32"
	"unsafe"
)

const base62Alphabet = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"

// checksum is CRC-32 (IEEE) of body as 6 base62 digits, as GitHub tokens
// do: it catches typos and garbage, not forgery.
func checksum(body string) string {
	var out [checksumLen]byte
	n := crc32.ChecksumIEEE([]byte(body))
	for i := checksumLen - 1; i >= 0; i-- {
		out[i] = base62Alphabet[n%62]
		n /= 62
	}
	return string(out[:])
}

func checksumMatches(body, sum string) bool {
	// crc32 only reads the bytes; a view avoids copying them on the hot path.
	n := crc32.ChecksumIEEE(unsafe.Slice(unsafe.StringData(body), len(body)))
	for i := checksumLen - 1; i >= 0; i-- {
		if sum[i] != base62Alphabet[n%62] {
			return false
		}
		n /= 62
	}
	return true
}

// randomBase62 returns n uniformly random base62 characters.
func randomBase62(n int) (string, error) {
	out := make([]byte, 0, n)
	buf := make([]byte, n+n/2)
	for len(out) < n {
		if _, err := rand.Read(buf); err != nil {
			return "", fmt.Errorf("tokens: random: %w", err)
		}
		for _, b := range buf {
			// 248 = 4*62: rejection keeps the distribution uniform.
			if b < 248 && len(out) < n {
				out = append(out, base62Alphabet[b%62])
			}
		}
	}
	return string(out), nil
}

func generate(prefix string, n int) (string, error) {
	r, err := randomBase62(n)
	if err != nil {
		return "", err
	}
	body := prefix + r
	return body + checksum(body), nil
}

// GeneratePair returns a new public key and secret key.
func GeneratePair() (public, secret string, err error) {
	if public, err = generate(PublicPrefix, publicRandLen); err != nil {
		return "", "", err
	}
	if secret, err = generate(SecretPrefix, secretRandLen); err != nil {
		return "", "", err
	}
	return public, secret, nil
}

// GenerateToken returns a new opaque token.
func GenerateToken() (string, error) {
	return generate(TokenPrefix, tokenRandLen)
}

// NewID returns a random (version 4) UUID.
func NewID() (string, error) {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", fmt.Errorf("tokens: random: %w", err)
	}
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16]), nil
}
