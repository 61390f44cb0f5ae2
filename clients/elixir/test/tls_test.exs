defmodule SseGateway.TLSTest do
  # An https gateway: a TLS-terminating proxy (OTP :ssl, a throwaway CA from
  # :public_key.pkix_test_data/1) in front of the real binary. Covers the :ssl
  # transport of streams and the TLS options of :httpc publishes.
  use ExUnit.Case, async: true

  alias SseGateway.TestSupport.Gateway

  @key {:namedCurve, :secp256r1}

  setup do
    {:ok, _} = Application.ensure_all_started(:ssl)
    gw = start_supervised!({Gateway, []})
    chain = %{root: [key: @key], intermediates: [], peer: [key: @key]}
    certs = :public_key.pkix_test_data(%{server_chain: chain, client_chain: chain})

    {:ok, listen} =
      :ssl.listen(0, [:binary, active: false, reuseaddr: true] ++ certs.server_config)

    {:ok, {_, port}} = :ssl.sockname(listen)
    upstream = Gateway.port(gw)
    acceptor = spawn_link(fn -> accept(listen, upstream) end)
    on_exit(fn -> Process.exit(acceptor, :kill) end)

    # Trust the throwaway CA; the certificate names no host, so no host check.
    ssl = [
      verify: :verify_peer,
      cacerts: certs.client_config[:cacerts],
      server_name_indication: :disable
    ]

    %{url: "https://127.0.0.1:#{port}", ssl: ssl}
  end

  test "publish and subscribe over https", %{url: url, ssl: ssl} do
    opts = [url: url, ssl: ssl, mode: :sync]
    assert :ok = SseGateway.subscribe("tls:t", opts)
    assert {:ok, id} = SseGateway.publish("tls:t", :over_tls, %{"ok" => true}, opts)

    assert_receive {:sse_gateway, :event,
                    %SseGateway.Event{id: ^id, event: "over_tls", data: %{"ok" => true}}},
                   3_000
  end

  test "a certificate from another CA is refused", %{url: url} do
    chain = %{root: [key: @key], intermediates: [], peer: [key: @key]}
    other = :public_key.pkix_test_data(%{server_chain: chain, client_chain: chain})

    ssl = [
      verify: :verify_peer,
      cacerts: other.client_config[:cacerts],
      server_name_indication: :disable
    ]

    assert {:error, %SseGateway.Error{code: "connection_failed"}} =
             SseGateway.publish("tls:t", :e, %{}, url: url, ssl: ssl, mode: :sync, retries: 0)
  end

  defp accept(listen, upstream) do
    {:ok, tls} = :ssl.transport_accept(listen)

    spawn(fn ->
      with {:ok, tls} <- :ssl.handshake(tls, 5_000),
           {:ok, tcp} <- :gen_tcp.connect({127, 0, 0, 1}, upstream, [:binary, active: false]) do
        me = self()
        spawn_link(fn -> pump(fn -> :ssl.recv(tls, 0) end, &:gen_tcp.send(tcp, &1), me) end)
        spawn_link(fn -> pump(fn -> :gen_tcp.recv(tcp, 0) end, &:ssl.send(tls, &1), me) end)

        receive do
          :done -> :ok
        end

        :ssl.close(tls)
        :gen_tcp.close(tcp)
      end
    end)

    accept(listen, upstream)
  end

  defp pump(recv, send_to, owner) do
    with {:ok, data} <- recv.(), :ok <- send_to.(data) do
      pump(recv, send_to, owner)
    else
      _ -> send(owner, :done)
    end
  end
end
