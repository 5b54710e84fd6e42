module github.com/extauthz/extauthz

go 1.26.8

require (
	github.com/google/go-cmp v0.7.0
	go.uber.org/zap v1.28.0
	golang.org/x/sync v0.24.0
)

require (
	github.com/stretchr/testify v1.11.1 // indirect
	go.uber.org/multierr v1.10.0 // indirect
)
